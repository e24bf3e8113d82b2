"""LongSpec-style lossless speculative decoding with a constant-size-KV draft.

    out = longflow_patch.speculative_generate(model, input_ids, max_new_tokens=512, draft="self", budget=1024)

Each round (a plain loop, gpt-fast style):

1. the draft proposes ``k`` tokens, one decode step each, over its constant-size LongFlow cache
   (``draft="self"``: the target's own weights; or a smaller model with the same vocabulary); or a
   GLIDE draft (LongSpec's one layer over the target's cache, `longflow_patch.glide_round`)
   proposes a chain or a static-shape tree (``draft_tree``);
2. the target scores the last accepted token and the ``k`` drafts in one forward over its full
   cache; each layer's attention is ``torch.ops.longflow.verify_attention`` (the long prefix read
   once for all draft queries, the draft tokens under a causal mask, merged by log-sum-exp);
3. acceptance: greedy keeps the drafts that match the target's argmax, then the target's own
   token; sampling uses standard speculative sampling (accept ``d`` with ``min(1, p(d) / q(d))``,
   else sample from ``max(0, p - q)`` normalised; a bonus token from ``p`` when all are accepted),
   so the output follows the target's distribution exactly;
4. rollback: the target's cache is cut back to the accepted tokens, the draft's compressed cache
   undoes its rejected steps (`DraftCache`).

For a self-draft the prompt runs once: the target's prompt pass also fills the draft's cache.
With ``compile=True`` a whole round's device work, the draft's chain of ``k`` steps (token choice
included: greedy argmax, or Gumbel-max sampling with noise drawn before the chain) and the
``k + 1``-token verification forward, is compiled as one static-shape graph (both caches keep
fixed addresses and device-side lengths), so a round is one CUDA-graph replay on a GPU plus the
acceptance and rollback; the few shorter rounds at the end of an output run eagerly.

Greedy output equals ``model.generate(do_sample=False)`` token for token, up to floating-point
ties: verification computes the same logits in a different order (a ``T``-row forward instead of
``T`` one-row forwards), as every speculative decoder does.

Batch size 1: rows of a batch accept different numbers of tokens, so their caches would need
ragged lengths (the verify op supports ragged prefixes; the loop and caches do not yet).
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from longflow_patch.draft_tree import DraftTree
from longflow_patch.glide import GlideDraft
from longflow_patch.glide_round import GlideRound
from longflow_patch.patch import SUPPORTED_MODELS, _check_model, apply, prepare_for_decoding, unapply
from longflow_patch.policies import make_policy
from longflow_patch.sampling import Sampler
from longflow_patch.speculative_cache import DraftCache, SpeculativeCache
from longflow_patch.speculative_round import RoundBase, SpeculativeStats, compile_settings, position_ids


@contextlib.contextmanager
def _patched(model: nn.Module, budget: int) -> Iterator[None]:
    """Patch ``model``'s attention for the duration, unless it already is; restore it afterwards.
    Either way it is prepared for decoding afresh first (`prepare_for_decoding`: fused q/k/v)."""
    if hasattr(model, "_longflow_policy"):
        prepare_for_decoding(model)
        yield
        return
    apply(model, budget=budget)
    prepare_for_decoding(model)
    try:
        yield
    finally:
        unapply(model)


class _Round(RoundBase):
    """A round of a draft model (the target itself, or a smaller one) over a LongFlow `DraftCache`."""

    def __init__(self, target: nn.Module, draft: nn.Module, draft_cache: DraftCache, sampler: Sampler, k: int,
                 compile_options: dict | None):  # fmt: skip
        super().__init__(target, sampler, compile_options)
        self.draft, self.draft_cache, self.k = draft, draft_cache, k

    def prefill(self, prompt: torch.Tensor, capacity: int) -> torch.Tensor:
        """Fill both caches from the prompt ``[1, L]``; returns the first new token ``[1]``."""
        shared = self.draft is self.target
        self.target_cache = SpeculativeCache(self.target.config.num_hidden_layers, capacity,
                                             self.draft_cache if shared else None)  # fmt: skip
        positions = position_ids(0, prompt.shape[1], prompt.device)
        logits = self._forward(self.target, prompt, positions, self.target_cache, logits_to_keep=1)
        if not shared:
            self._forward(self.draft, prompt, positions, self.draft_cache, logits_to_keep=1)
        self.draft_len = prompt.shape[1]  # tokens the draft cache has consumed
        return self.sampler.sample(self.sampler.probs(logits))

    def draft_chain(self, ids: torch.Tensor, positions: torch.Tensor, noise: torch.Tensor | None, count: int):
        """``count`` draft decode steps: the first reads the pending tokens ``ids`` ``[1, n]`` at
        ``positions`` ``[1, n]``, each later one the token before it. Returns the drafts
        ``[count]`` int64 and their scores ``[count, V]`` (`Sampler.probs`). No host decision
        inside, so it compiles into one graph; ``noise`` ``[count, V]`` comes from `Sampler.noise`."""
        tokens, scores = [], []
        for step in range(count):
            q = self.sampler.probs(self._forward(self.draft, ids, positions, self.draft_cache, logits_to_keep=1))
            token = self.sampler.pick(q, None if noise is None else noise[step : step + 1])
            tokens.append(token)
            scores.append(q)
            ids, positions = token[None], positions[:, -1:] + 1
        return torch.cat(tokens), torch.cat(scores)

    def draft_and_verify(self, pending: torch.Tensor, positions: torch.Tensor, noise: torch.Tensor | None,
                         count: int):  # fmt: skip
        """`draft_chain`, then the target's forward over the last accepted token (the last of
        ``pending``) and the ``count`` drafts. Returns the drafts ``[count]``, their draft scores
        ``[count, V]`` and the target's scores ``[count + 1, V]``; device work only, one graph."""
        drafts, draft_scores = self.draft_chain(pending, positions, noise, count)
        verify_ids = torch.cat([pending[:, -1:], drafts[None]], dim=1)
        verify_positions = positions[:, -1:] + torch.arange(count + 1, device=positions.device)
        logits = self._forward(self.target, verify_ids, verify_positions, self.target_cache)
        return drafts, draft_scores, self.sampler.probs(logits)

    def step(self, sequence: torch.Tensor, remaining: int) -> torch.Tensor:
        """One draft-verify-accept round after the accepted ``sequence`` ``[N]``; returns the new
        tokens (at least one) and leaves both caches holding exactly the accepted tokens."""
        count = min(self.k, remaining - 1)
        length, device = sequence.shape[0], sequence.device
        if count:
            self.draft_cache.commit()
            pending = sequence[self.draft_len :][None]
            noise = self.sampler.noise(count, self.target.config.vocab_size, device)
            full = self.full_round is not None and count == self.k  # short rounds at the end run eagerly
            round_fn = self.full_round if full else self.draft_and_verify
            positions = position_ids(self.draft_len, pending.shape[1], device)
            drafts, draft_scores, target_scores = round_fn(pending, positions, noise, count)
            self.stats.draft_forwards += count
        else:
            drafts, draft_scores = sequence.new_empty(0), None
            logits = self._forward(
                self.target, sequence[-1:][None], position_ids(length - 1, 1, device), self.target_cache
            )
            target_scores = self.sampler.probs(logits)
        accepted, last = self.sampler.accept(drafts, draft_scores, target_scores)
        self.target_cache.rollback(length + accepted)
        if count:
            kept = min(accepted, count - 1)  # the draft has consumed its pending tokens and count - 1 drafts
            self.draft_cache.rollback(count - 1 - kept, logged=pending.shape[1] + count - 1)
            self.draft_len = length + kept
        self.count_round(count, accepted)
        return torch.cat([drafts[:accepted], last])


def _check_inputs(model: nn.Module, draft: nn.Module, input_ids: torch.Tensor, num_draft_tokens: int) -> None:
    _check_model(model)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate supports batch size 1; got input_ids of shape {tuple(input_ids.shape)}")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if isinstance(draft, GlideDraft):
        draft.check_target(model)
        mine, theirs = next(draft.parameters()), next(model.parameters())
        if (mine.dtype, mine.device) != (theirs.dtype, theirs.device):
            raise ValueError(f"the GLIDE draft is {mine.dtype} on {mine.device}, the target {theirs.dtype} on "
                             f"{theirs.device}; load it with load_glide_draft(..., target=model)")  # fmt: skip
    elif draft is not model:
        if type(draft).__name__ not in SUPPORTED_MODELS:
            raise TypeError(f"unsupported draft model {type(draft).__name__}; supported: {', '.join(SUPPORTED_MODELS)}")
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's "
                f"({model.config.vocab_size}); a draft must share the target's tokenizer"
            )
        _check_model(draft)


def _stop_index(tokens: torch.Tensor, eos: set[int]) -> int | None:
    """Index just past the first EOS in ``tokens`` ``[n]``, or None."""
    if eos:
        for index, token in enumerate(tokens.tolist()):
            if token in eos:
                return index + 1
    return None


@torch.inference_mode()
def speculative_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    draft: str | nn.Module = "self",
    budget: int = 1024,
    num_draft_tokens: int = 4,
    draft_tree: tuple[int, ...] | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    compile: bool | dict = False,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SpeculativeStats]:
    """Generate like ``model.generate``, faster, with the target's output distribution.

    Args:
        model: a Llama / Qwen2 / Qwen3 causal LM (patched by `apply` or not: an unpatched model
            is patched for the call and restored).
        input_ids: ``[1, L]`` prompt; ``attention_mask`` ``[1, L]`` may mark left padding.
        max_new_tokens: defaults to the generation config's (or ``max_length - L``).
        draft: ``"self"`` (the same model over a constant-size LongFlow cache of ``budget`` slots
            per layer), a smaller Llama / Qwen2 / Qwen3 model with the same vocabulary (also
            over a ``budget``-slot LongFlow cache), or a `GlideDraft` trained for this target
            (`load_glide_draft`; one layer over its own sink-and-window cache and the target's cache).
        num_draft_tokens: draft tokens per round ``k``; each round verifies ``k + 1`` positions.
        draft_tree: a GLIDE draft only: draft a tree of ``draft_tree[d - 1]`` nodes at depth ``d``
            (top-k at each depth, `DraftTree`) instead of a ``num_draft_tokens`` chain; each round
            verifies ``1 + sum(draft_tree)`` positions in one forward under the tree mask.
        do_sample, temperature, top_k, top_p: default to the model's generation config.
        generator: random source for sampling (on the model's device).
        compile: compile each round's draft steps and its verification forward as one graph
            (``fullgraph=True``, static shapes; ``True``: ``mode="reduce-overhead"``, CUDA graphs on
            a GPU; a dict: these ``torch.compile`` options). Apply `longflow_patch.apply` to the
            models first, or each call re-patches them and recompiles.
        return_stats: also return a `SpeculativeStats`.

    Returns:
        ``[1, L + n]`` token ids, the prompt (as given) followed by the new tokens, stopping after
        EOS or ``max_new_tokens``, like ``generate``.
    """
    draft_model = model if isinstance(draft, str) and draft == "self" else draft
    if isinstance(draft_model, str):
        raise ValueError(f"draft must be 'self' or a model, got {draft!r}")
    _check_inputs(model, draft_model, input_ids, num_draft_tokens)
    glide = isinstance(draft_model, GlideDraft)
    if draft_tree is not None and not glide:
        raise ValueError("draft_tree needs a GLIDE draft (draft=load_glide_draft(...)): a LongFlow draft cache "
                         "cannot hold branches")  # fmt: skip
    config = model.generation_config
    sampler = Sampler.from_config(config, do_sample, temperature, top_k, top_p, generator)
    prompt = input_ids[0] if attention_mask is None else input_ids[0][attention_mask[0].bool()]
    if max_new_tokens is None:
        max_new_tokens = config.max_new_tokens or max(config.max_length - input_ids.shape[1], 0)
    eos = config.eos_token_id if config.eos_token_id is not None else []
    eos = {eos} if isinstance(eos, int) else set(eos)
    if glide:
        tree = DraftTree(tuple(draft_tree) if draft_tree is not None else (1,) * num_draft_tokens)
        decoder = GlideRound(model, draft_model, sampler, tree, compile_settings(compile))
        verified = tree.nodes + 1
    else:
        draft_cache = DraftCache(make_policy("longflow", budget=budget), draft_model.config.num_hidden_layers,
                                 num_draft_tokens + 1)  # fmt: skip
        decoder = _Round(model, draft_model, draft_cache, sampler, num_draft_tokens, compile_settings(compile))
        verified = num_draft_tokens + 1
    new = prompt.new_empty(0)
    if max_new_tokens > 0:
        patch_draft = contextlib.nullcontext() if glide else _patched(draft_model, budget)
        with _patched(model, budget), patch_draft:
            new = decoder.prefill(prompt[None], prompt.shape[0] + max_new_tokens + verified)
            stop = _stop_index(new, eos)
            while stop is None and new.shape[0] < max_new_tokens:
                tokens = decoder.step(torch.cat([prompt, new]), max_new_tokens - new.shape[0])
                stop = None if (hit := _stop_index(tokens, eos)) is None else new.shape[0] + hit
                new = torch.cat([new, tokens])
            new = new[: stop or max_new_tokens]
    decoder.stats.new_tokens = new.shape[0]
    output = torch.cat([input_ids, new[None].to(input_ids.dtype)], dim=1)
    return (output, decoder.stats) if return_stats else output
