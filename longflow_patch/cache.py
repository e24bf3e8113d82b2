"""The fixed-budget KV cache: per layer, ``budget`` slots per sequence, allocated once.

A slot holds one token's key and value (after RoPE) and that token's sequence position
(``-1`` marks an empty slot: unfilled, or padding). Each decode step the fused op writes the new
token into the slot chosen at the previous step and chooses the next one, so the cache never
grows: memory is flat in output length and every decode step has the same shapes.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longflow_patch.kernels.decode_attention_reference import ScoreKind, rank_slots
from longflow_patch.ops import decode_attention
from longflow_patch.policies import Policy
from longflow_patch.prefill import score_prompt


class LongFlowLayer(CacheLayerMixin):
    """One layer's slots.

    Buffers (allocated at prefill; B batch, Hkv KV heads, S = budget slots, D head dim):
        keys, values: ``[B, Hkv, S, D]`` in the model's dtype
        value_norm: ``[B, Hkv, S]`` float32, ``||v||_1`` of each slot's value (written with it)
        slot_pos: ``[B, Hkv, S]`` int32, sequence position held by each slot, -1 if empty
        write_slot: ``[B, Hkv]`` int32, slot the next token goes to
        slot_limit: ``[B, Hkv]`` int32, usable slots per head (all S unless budgets are ragged)
        accumulated: ``[B, Hsel, S]`` float32 running scores, only for accumulating policies
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy
        self.seen_tokens = 0
        self.value_norm: torch.Tensor | None = None
        self.slot_pos: torch.Tensor | None = None
        self.write_slot: torch.Tensor | None = None
        self.slot_limit: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None

    # -- transformers' cache-layer interface ---------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        slots = self.policy.budget
        device = key_states.device
        self.keys = key_states.new_zeros(batch, kv_heads, slots, head_dim)
        self.values = value_states.new_zeros(batch, kv_heads, slots, value_states.shape[-1])
        self.value_norm = torch.zeros(batch, kv_heads, slots, dtype=torch.float32, device=device)
        self.slot_pos = torch.full((batch, kv_heads, slots), -1, dtype=torch.int32, device=device)
        self.write_slot = torch.zeros(batch, kv_heads, dtype=torch.int32, device=device)
        self.slot_limit = torch.full((batch, kv_heads), slots, dtype=torch.int32, device=device)
        if self.policy.accumulate:
            selectors = kv_heads if self.policy.per_head else 1
            self.accumulated = torch.zeros(batch, selectors, slots, dtype=torch.float32, device=device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "LongFlowCache is filled by the patched attention (longflow_patch.apply), not by Cache.update"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens processed so far (prompt, padding included, plus generated), not slots held."""
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.is_initialized:
            self.slot_pos.fill_(-1)
            self.write_slot.zero_()
            if self.accumulated is not None:
                self.accumulated.zero_()
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._index_batch(beam_idx.to(self.keys.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._index_batch(indices.to(self.keys.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats)
            self._index_batch(rows)

    def _index_batch(self, rows: torch.Tensor) -> None:
        for name in ("keys", "values", "value_norm", "slot_pos", "write_slot", "slot_limit", "accumulated"):
            buffer = getattr(self, name)
            if buffer is not None:
                setattr(self, name, buffer.index_select(0, rows))

    # -- LongFlow ------------------------------------------------------------------------------
    def prefill(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        is_token: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
    ) -> None:
        """Fill the slots from the prompt and choose the first slot to write.

        ``query`` ``[B, Hq, T, D]``; ``keys``/``values`` ``[B, Hkv, T, D]``; ``is_token`` ``[B, T]``
        bool (False for padding); ``positions`` ``[B, T]`` sequence positions. When the prompt
        is longer than the budget, the policy's prompt scores pick which tokens stay; sinks and
        the recent window always do.
        """
        self.lazy_initialization(keys, values)
        policy = self.policy
        batch, kv_heads, length, head_dim = keys.shape
        slots = policy.budget
        positions = positions.to(torch.int32)
        token_pos = torch.where(is_token, positions, -1)[:, None, :].expand(batch, kv_heads, length)
        last_position = positions[:, -1]

        if length < slots:
            kept_pos, kept_score = token_pos, torch.zeros(batch, kv_heads, length, device=keys.device)
            self.keys[:, :, :length] = keys
            self.values[:, :, :length] = values
        else:
            score = self._prompt_scores(query, keys, values, is_token, positions, scale)
            selectors = score.shape[1]
            rank = rank_slots(
                score,
                token_pos[:, :selectors],
                torch.ones_like(score, dtype=torch.bool),
                last_position,
                policy.sink_tokens,
                policy.recent_window,
            )
            # Keep the `slots` highest-ranked tokens: protected first, empty (padding) last.
            keep = rank.topk(slots, dim=-1).indices.sort(dim=-1).values
            keep = keep.expand(batch, kv_heads, slots)
            kept_score = score.expand(batch, kv_heads, length).gather(-1, keep)
            kept_pos = token_pos.gather(-1, keep)
            gather = keep[..., None].expand(-1, -1, -1, head_dim)
            self.keys.copy_(keys.gather(2, gather))
            self.values.copy_(values.gather(2, gather.expand(-1, -1, -1, values.shape[-1])))
        kept = kept_pos.shape[-1]
        self.slot_pos[:, :, :kept] = kept_pos
        self.value_norm[:, :, :kept] = self.values[:, :, :kept].float().abs().sum(dim=-1)
        if self.accumulated is not None:
            self.accumulated[:, :, :kept] = kept_score[:, : self.accumulated.shape[1]]
        selectors = kv_heads if policy.per_head else 1
        score = torch.zeros(batch, selectors, slots, device=keys.device)
        score[:, :, :kept] = kept_score[:, :selectors]
        usable = torch.ones_like(score, dtype=torch.bool)
        rank = rank_slots(
            score, self.slot_pos[:, :selectors], usable, last_position, policy.sink_tokens, policy.recent_window
        )
        self.write_slot.copy_(rank.argmin(dim=-1).to(torch.int32).expand(batch, kv_heads))
        self.seen_tokens = length

    def _prompt_scores(self, query, keys, values, is_token, positions, scale) -> torch.Tensor:
        """``[B, Hsel, T]`` prompt scores under this policy (Hsel = 1 when eviction is shared)."""
        policy = self.policy
        if policy.score_kind == ScoreKind.POSITION:
            score = positions.float()[:, None, :].expand(-1, keys.shape[1], -1)
        else:
            score = score_prompt(
                query,
                keys,
                values,
                is_token,
                scale,
                policy.observation_window,
                policy.pooling_kernel,
                policy.score_kind,
            )
        return score if policy.per_head else score.sum(dim=1, keepdim=True)

    def decode(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Run the fused op for each new token in order; returns ``[B, n, Hq, D]``.

        ``query`` ``[B, Hq, n, D]``; ``keys``/``values`` ``[B, Hkv, n, D]``; ``positions`` ``[B, n]``.
        """
        policy = self.policy
        positions = positions.to(torch.int32)
        outputs = []
        for step in range(query.shape[2]):
            outputs.append(
                decode_attention(
                    query[:, :, step].contiguous(),
                    keys[:, :, step].contiguous(),
                    values[:, :, step].contiguous(),
                    self.keys,
                    self.values,
                    self.value_norm,
                    self.slot_pos,
                    self.write_slot,
                    positions[:, step].contiguous(),
                    self.slot_limit,
                    self.accumulated,
                    scale,
                    policy.sink_tokens,
                    policy.recent_window,
                    not policy.per_head,
                    int(policy.score_kind),
                )
            )
        self.seen_tokens += query.shape[2]
        return torch.stack(outputs, dim=1)

    def kv_bytes(self) -> int:
        """Bytes held by this layer's keys and values."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class LongFlowCache(Cache):
    """A transformers ``Cache`` of ``LongFlowLayer`` s, one per decoder layer, all under one policy."""

    def __init__(self, policy: Policy, num_layers: int):
        super().__init__(layers=[LongFlowLayer(policy) for _ in range(num_layers)])
        self.policy = policy

    def kv_bytes(self) -> int:
        """Bytes held by keys and values over all layers."""
        return sum(layer.kv_bytes() for layer in self.layers)
