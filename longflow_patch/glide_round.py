"""A speculative round with a GLIDE draft (`longflow_patch.glide`): a chain or a static-shape tree.

Per round, after the accepted tokens up to the root (the last accepted token, position ``n``):

1. the draft reads the pending tokens (the root, and the last round's deepest draft when every
   draft was kept): their keys and values go to its sink-and-window cache (`GlideCache`), and the
   root's logits give depth 1;
2. each further depth reads the previous depth's nodes at once (all at position ``n + depth``),
   their keys and values going to the cache's tree buffer; their self-attention sees the cache and
   their ancestors, their cross-attention the target's cache of one layer, which holds positions
   ``< n`` (so the ``d``-th draft step reads a cache ``d`` tokens behind, as in training);
3. the target verifies the root and every node in one forward (`SpeculativeCache` under the tree
   mask; a chain's is causal) and the sampler keeps the longest path (`Sampler.accept` for a chain,
   whose sampled drafts follow standard speculative sampling; `Sampler.accept_tree` for a tree);
4. the target's cache keeps the root and the path (`SpeculativeCache.keep`), the draft's cache the
   path's nodes it read (`GlideCache.commit`); nothing else needs undoing.

Steps 1-3 are device work with static shapes (one graph under ``compile``); the acceptance reads
the target's choices on the host once per round.
"""

import torch
import torch.nn.functional as F
from torch import nn

from longflow_patch.draft_tree import DraftTree, expand
from longflow_patch.glide import GlideDraft
from longflow_patch.glide_cache import GlideCache
from longflow_patch.sampling import Sampler
from longflow_patch.speculative_cache import SpeculativeCache
from longflow_patch.speculative_round import RoundBase, position_ids
from longflow_patch.verify_ops import verify_attention


class GlideRound(RoundBase):
    """Rounds of a GLIDE draft drafting ``tree`` (widths of 1: a chain)."""

    def __init__(self, target: nn.Module, glide: GlideDraft, sampler: Sampler, tree: DraftTree,
                 compile_options: dict | None):  # fmt: skip
        super().__init__(target, sampler, compile_options)
        self.glide, self.tree = glide, tree
        self.embed = target.get_input_embeddings()
        self.rotary = target.model.rotary_emb
        self.layer_index = glide.target_layer_index(target.config.num_hidden_layers)
        self.scale = glide.config.head_dim**-0.5

    def prefill(self, prompt: torch.Tensor, capacity: int) -> torch.Tensor:
        """Run the target over the prompt ``[1, L]`` and store the draft's keys and values of its sink
        and window positions; returns the first new token ``[1]``."""
        device, length = prompt.device, prompt.shape[1]
        self.target_cache = SpeculativeCache(self.target.config.num_hidden_layers, capacity)
        logits = self._forward(self.target, prompt, position_ids(0, length, device), self.target_cache, 1)
        parameter = next(self.glide.parameters())
        self.cache = GlideCache(self.glide.config, self.tree.fed, parameter.dtype, device)
        self.tree_mask = torch.zeros(self.tree.nodes + 1, self.tree.nodes + 1, dtype=torch.bool, device=device)
        torch._dynamo.mark_static_address(self.tree_mask)
        sinks, window = self.cache.sinks, self.cache.window
        kept = torch.cat([torch.arange(min(sinks, length)), torch.arange(max(sinks, length - window), length)])
        kept = kept.to(device)
        embeds = self.embed(prompt[:, kept])
        keys, values = self.glide.self_key_values(embeds, *self.rotary(embeds, kept[None]))
        self.cache.write(keys, values, kept)
        self.draft_len = length  # positions in the draft's cache
        return self.sampler.sample(self.sampler.probs(logits))

    def draft_logits(self, ids: torch.Tensor, positions: torch.Tensor, tree_visible: torch.Tensor | None,
                     tree_start: int | None) -> torch.Tensor:  # fmt: skip
        """The draft's logits ``[n, V]`` (float32) after ``ids`` ``[1, n]`` at ``positions`` ``[1, n]``.

        ``tree_start`` None: accepted tokens, stored in the cache at their positions. Else draft
        nodes, stored in the tree buffer from ``tree_start``; ``tree_visible`` ``[n, fed]`` bool says
        which tree slots each of them sees (its ancestors and itself).
        """
        embeds = self.embed(ids)
        cos, sin = self.rotary(embeds, positions)
        cache, layer = self.cache, self.target_cache.layers[self.layer_index]

        def self_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            if tree_start is None:
                cache.write(keys, values, positions[0])
            else:
                cache.write_tree(keys, values, tree_start)
            tree = tree_visible if tree_visible is not None else positions.new_zeros(ids.shape[1], 0, dtype=torch.bool)
            tree = F.pad(tree, (0, cache.tree_keys.shape[2] - tree.shape[1]))
            visible = torch.cat([cache.visible(positions[0]), tree], dim=1)
            all_keys = torch.cat([cache.keys, cache.tree_keys], dim=2)
            all_values = torch.cat([cache.values, cache.tree_values], dim=2)
            return F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=visible, scale=self.scale,
                                                  enable_gqa=True)  # fmt: skip

        def cross_attention(query: torch.Tensor) -> torch.Tensor:
            # the verification op with no visible draft keys: the target's cache, read once per KV head
            count = query.shape[2]
            none = query.new_zeros(1, layer.keys.shape[1], count, query.shape[3])
            hidden = torch.zeros(count, count, dtype=torch.bool, device=query.device)
            prefix_len = layer.length.to(torch.int32).view(1)
            return verify_attention(query, layer.keys, layer.values, prefix_len, none, none, hidden, self.scale)

        hidden = self.glide(embeds, cos, sin, self_attention, cross_attention)
        return self.target.lm_head(hidden)[0].float()

    def draft_and_verify(self, pending: torch.Tensor, positions: torch.Tensor, noise: torch.Tensor | None,
                         tree: DraftTree):  # fmt: skip
        """Draft ``tree`` after the pending tokens ``[1, P]`` at ``positions`` ``[1, P]`` (the root
        last), then verify it. Returns the nodes' tokens ``[N]`` and parents ``[N]`` (int64, -1: the
        root), their draft scores ``[N, V]`` (a chain's, for speculative sampling; None for a tree)
        and the target's scores ``[N + 1, V]`` (root first). Device work only, static shapes."""
        root = positions[:, -1:]
        logits = self.draft_logits(pending, positions, None, None)[-1:]
        path_log_probs = logits.new_zeros(1)
        tokens, parents, scores, rows = [], [], [], []
        own = torch.eye(tree.nodes, dtype=torch.bool, device=pending.device)
        for depth, (width, offset) in enumerate(zip(tree.widths, tree.offsets, strict=True), 1):
            q = self.sampler.probs(logits)
            if tree.is_chain:  # one node per depth: the draft's sample (its argmax when greedy)
                token = self.sampler.pick(q, None if noise is None else noise[depth - 1 : depth])
                local = torch.zeros_like(token)
                scores.append(q)
            else:
                log_probs = q.log() if self.sampler.do_sample else logits.log_softmax(dim=-1)
                token, local, path_log_probs = expand(log_probs, path_log_probs, width)
            node_rows = own[offset : offset + width] | (rows[-1][local] if rows else False)
            tokens.append(token)
            parents.append(local + tree.offsets[depth - 2] if depth > 1 else torch.full_like(local, -1))
            rows.append(node_rows)
            if depth < tree.depth:
                node_positions = (root + depth).expand(1, width)
                logits = self.draft_logits(token[None], node_positions, node_rows[:, : tree.fed], offset)
        depths = torch.cat([torch.full_like(token, depth) for depth, token in enumerate([root[0], *tokens])])
        tokens, parents = torch.cat(tokens), torch.cat(parents)
        verify_ids = torch.cat([pending[:, -1:], tokens[None]], dim=1)
        if not tree.is_chain:  # the root sees itself; a node, the root, its ancestors and itself
            draft_mask = self.target_cache.draft_mask
            draft_mask[:, 0] = True
            draft_mask[0, 1:] = False
            draft_mask[1:, 1:] = torch.cat(rows)
        logits = self._forward(self.target, verify_ids, root + depths, self.target_cache)
        return tokens, parents, torch.cat(scores) if scores else None, self.sampler.probs(logits)

    def step(self, sequence: torch.Tensor, remaining: int) -> torch.Tensor:
        """One draft-verify-accept round after the accepted ``sequence`` ``[N]``; returns the new
        tokens (at least one) and leaves both caches holding exactly the accepted tokens."""
        depth = min(self.tree.depth, remaining - 1)
        length, device = sequence.shape[0], sequence.device
        root = length - 1
        if not depth:  # the last token: the target alone
            self.target_cache.draft_mask = None
            logits = self._forward(self.target, sequence[-1:][None], position_ids(root, 1, device), self.target_cache)
            _, last = self.sampler.accept(sequence.new_empty(0), None, self.sampler.probs(logits))
            self.target_cache.rollback(length)
            self.count_round(0, 0)
            return last
        tree = self.tree if depth == self.tree.depth else self.tree.prefix(depth)
        full = self.full_round is not None and tree is self.tree  # short rounds at the end run eagerly
        if tree.is_chain:
            self.target_cache.draft_mask = None
        else:
            self.target_cache.draft_mask = (
                self.tree_mask if tree is self.tree else self.tree_mask[: tree.nodes + 1, : tree.nodes + 1].clone()
            )
        pending = sequence[self.draft_len :][None]
        noise = self.sampler.noise(depth, self.target.config.vocab_size, device) if tree.is_chain else None
        round_fn = self.full_round if full else self.draft_and_verify
        tokens, parents, draft_scores, target_scores = round_fn(
            pending, position_ids(self.draft_len, pending.shape[1], device), noise, tree
        )
        if tree.is_chain:
            accepted, last = self.sampler.accept(tokens, draft_scores, target_scores)
            path = list(range(accepted))
        else:
            path, last = self.sampler.accept_tree(tokens, parents, target_scores)
        self.target_cache.keep(root, [node + 1 for node in path])
        read = [node for node in path if node < tree.fed]  # the deepest level was never read by the draft
        self.cache.commit(read, root + 1)
        self.draft_len = root + 1 + len(read)
        self.stats.draft_forwards += depth
        self.count_round(depth, len(path))
        return torch.cat([tokens[path], last])
