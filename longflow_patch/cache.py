"""The fixed-budget KV cache: per layer, ``budget`` slots per sequence, allocated once.

A slot holds one token's key and value (after RoPE), ``||v||_1`` and that token's sequence
position (``-1`` marks an empty slot: unfilled, or padding). Each decode step the fused op writes
the new token into the slot chosen at the previous step and chooses the next one, so the cache
never grows: memory is flat in output length and every decode step has the same shapes.
"""

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longflow_patch.kernels.decode_attention_reference import rank_slots
from longflow_patch.ops import NewTokenPreparation, decode_step
from longflow_patch.policies import Policy, window_attention


def _rows(token: torch.Tensor) -> torch.Tensor:
    """``token`` ``[B, H, D]`` with a contiguous last dim, copied only if it lacks one. The op reads
    rows through their batch and head strides, so a slice of the fused q/k/v projection's output
    (`longflow_patch.fused_projections`) goes in as it is: copying it had inductor add a copy of
    v to every layer's norm + RoPE kernel."""
    return token if token.stride(-1) == 1 else token.contiguous()


class LongFlowLayer(CacheLayerMixin):
    """One layer's slots.

    Buffers (allocated at prefill; B batch, Hkv KV heads, S = budget slots, D head dim):
        keys, values: ``[B, Hkv, S, D]`` in the model's dtype
        value_norm: ``[B, Hkv, S]`` float32, ``||v||_1`` of each slot's value (written with it)
        slot_pos: ``[B, Hkv, S]`` int32, sequence position held by each slot, -1 if empty
        write_slot: ``[B, Hkv]`` int32, slot the next token goes to
        slot_limit: ``[B, Hkv]`` int32, usable slots per head (all S unless budgets are ragged)
        planned_slots: mean live slots per head when budgets are ragged, else 0 (sizes the
            kernel's work split; the per-layer total stays fixed as budget moves between heads)
        accumulated: ``[B, Hsel, S]`` float32 running scores, only for accumulating policies
        recent_queries: ``[B, Hq, W, D]`` ring of the last decode queries, only for compacting policies
    ``workspaces``: where eager decode steps keep their scratch buffers (`longflow_patch.ops.decode_step`),
    shared by the layers of a `LongFlowCache`.
    """

    is_sliding = False

    def __init__(self, policy: Policy, layer: int = 0, workspaces: dict | None = None):
        super().__init__()
        self.policy = policy
        self.layer = layer
        self.workspaces = {} if workspaces is None else workspaces
        self.prefilled = False
        self.token_count: torch.Tensor | None = None  # 0-d int64 on the cache's device: tokens seen so far
        self.free_slots = 0  # compacting policies: free slots left before the next re-selection
        self.ring_index = 0  # compacting policies: where the next decode query is recorded
        self.value_norm: torch.Tensor | None = None
        self.slot_pos: torch.Tensor | None = None
        self.write_slot: torch.Tensor | None = None
        self.slot_limit: torch.Tensor | None = None
        self.planned_slots = 0
        # Whether the op may leave this layer's scoring pass running beside the model's next kernels
        # (`kernels/side_stream.py`): only where the next decode call of the op comes before anything
        # else reads this layer's state, which `LongFlowCache` arranges for all its layers but the last.
        self.overlap_scoring = False
        self.initial_limits: list[int] = []  # live slots per KV head at prefill (host copy of slot_limit)
        self.accumulated: torch.Tensor | None = None
        self.recent_queries: torch.Tensor | None = None

    # -- transformers' cache-layer interface ---------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads = key_states.shape[:2]
        slots = self.policy.layer_slots(self.layer)
        device = key_states.device
        limits = self.policy.head_limits(self.layer) or [slots] * kv_heads
        if len(limits) != kv_heads or max(limits) > slots:
            raise ValueError(
                f"layer {self.layer}: head budgets {limits} do not fit {kv_heads} KV heads x {slots} slots"
            )
        self.initial_limits = limits
        self.planned_slots = 0 if min(limits) == slots else math.ceil(sum(limits) / kv_heads)
        shape = (batch, kv_heads, slots, key_states.shape[-1])
        if self.is_initialized and self.keys.shape == shape and self.keys.dtype == key_states.dtype:
            # Same shapes: keep the buffers (and their addresses, so captured CUDA graphs stay valid).
            self.slot_pos.fill_(-1)
            self.slot_limit.copy_(torch.tensor(limits, dtype=torch.int32).expand(batch, kv_heads))
            return
        self.keys = key_states.new_zeros(batch, kv_heads, slots, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, kv_heads, slots, value_states.shape[-1])
        self.value_norm = torch.zeros(batch, kv_heads, slots, dtype=torch.float32, device=device)
        self.slot_pos = torch.full((batch, kv_heads, slots), -1, dtype=torch.int32, device=device)
        self.write_slot = torch.zeros(batch, kv_heads, dtype=torch.int32, device=device)
        self.slot_limit = torch.tensor(limits, dtype=torch.int32, device=device).expand(batch, kv_heads).contiguous()
        if self.policy.accumulate:
            self.accumulated = torch.zeros(batch, self.selectors, slots, dtype=torch.float32, device=device)
        self.token_count = torch.zeros((), dtype=torch.int64, device=device)
        if not torch.compiler.is_compiling():
            # Fixed addresses: compiled decode steps mutate these in place, so CUDA graphs can replay.
            for buffer in self._buffers():
                torch._dynamo.mark_static_address(buffer)
        self.is_initialized = True

    @property
    def is_compileable(self) -> bool:
        """Per-step policies decode with static shapes; compacting ones re-select on the host."""
        return self.policy.compileable

    def _buffers(self) -> list[torch.Tensor]:
        names = ("keys", "values", "value_norm", "slot_pos", "write_slot", "slot_limit", "accumulated", "token_count")
        return [buffer for name in names if (buffer := getattr(self, name)) is not None]

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "an unpatched attention forward called LongFlowCache.update: a LongFlowCache is filled only by the "
            "attention that longflow_patch.apply installs. Either the model was not patched (call "
            "longflow_patch.apply(model) first), or the patched attention did not find the cache where this "
            "transformers release passes it; please report the latter"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Mask over the new tokens only (``kv_length = query_length``, offset 0): the patched
        attention reads padding from the prompt mask and slot positions afterwards, never a decode
        mask, and one whose shape never changes keeps compiled steps static. (An offset of tokens
        seen, a device tensor, made transformers' mask builder read it on the host every step: a
        device sync per step, outside the compiled graph.)"""
        return query_length, 0

    def get_seq_length(self) -> int | torch.Tensor:
        """Tokens processed so far (prompt, padding included, plus generated), not slots held.
        A 0-d tensor once filled (as transformers' static cache), so compiled steps need no sync."""
        return self.token_count if self.prefilled else 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.is_initialized:
            self.slot_pos.fill_(-1)
            self.write_slot.zero_()
            self.token_count.zero_()
            if self.accumulated is not None:
                self.accumulated.zero_()
        self.prefilled = False

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
        names = (
            "keys",
            "values",
            "value_norm",
            "slot_pos",
            "write_slot",
            "slot_limit",
            "accumulated",
            "recent_queries",
        )
        for name in names:
            buffer = getattr(self, name)
            if buffer is not None:
                setattr(self, name, buffer.index_select(0, rows))

    # -- LongFlow ------------------------------------------------------------------------------
    @property
    def selectors(self) -> int:
        """Eviction scopes per row: 1 when a layer's heads share eviction, else the KV heads."""
        return self.keys.shape[1] if self.policy.per_head else 1

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
        is longer than a head's live slots less ``policy.reserve``, the policy's prompt scores
        pick which tokens stay; sinks and the recent window always do.
        """
        self.lazy_initialization(keys, values)
        batch, kv_heads, length, _ = keys.shape
        positions = positions.to(torch.int32)
        token_pos = torch.where(is_token, positions, -1)[:, None, :].expand(batch, kv_heads, length)
        keep = [limit - self.policy.reserve for limit in self.initial_limits]
        if length <= min(keep):
            score = torch.zeros(batch, kv_heads, length, device=keys.device)
        else:
            score = self.policy.prompt_scores(query, keys, values, is_token, positions, scale)
        self._store_best(keys, values, token_pos, score, positions[:, -1], min(length, max(keep)))
        self.token_count.fill_(length)
        self.prefilled = True
        # Free slots of the head that runs out first (compacting policies re-select then).
        self.free_slots = min(limit - min(length, kept) for limit, kept in zip(self.initial_limits, keep, strict=True))
        self.ring_index = 0
        if self.policy.compacting:
            window = self.policy.observation_window
            self.recent_queries = query.new_zeros(*query.shape[:2], window, query.shape[-1])

    def _store_best(self, keys, values, token_pos, score, position, count: int) -> None:
        """Write the ``count`` best-ranked tokens into slots ``[0, count)``, clear the rest, and
        choose the first slot to write. A head keeps at most its live limit less
        ``policy.reserve`` of them (its best ones).

        ``keys``/``values`` ``[B, Hkv, T, D]`` and ``token_pos``/``score`` ``[B, Hkv, T]`` describe
        the candidates (prompt tokens, or the cache itself when compacting); ``position`` ``[B]``
        is the newest token's position (for the recent window).
        """
        policy = self.policy
        batch, kv_heads = keys.shape[:2]
        if not policy.per_head:
            score = score.sum(dim=1, keepdim=True)
        usable = torch.ones_like(score, dtype=torch.bool)
        rank = rank_slots(score, token_pos[:, : score.shape[1]], usable, position, policy.sink_tokens,
                          policy.recent_window)  # fmt: skip
        # The ``count`` best (protected tokens first, empty padding last). A head whose live limit less
        # the reserve is below ``count`` keeps its best that many; its other slots are cleared.
        # Kept tokens go in position order, as the model saw them: attention sums in the same order.
        best = rank.topk(count, dim=-1).indices.expand(batch, kv_heads, count)
        kept = self.slot_limit - policy.reserve
        overflow = torch.arange(count, device=keys.device) >= kept[..., None]
        chosen = best.gather(-1, (best + overflow * keys.shape[2]).argsort(dim=-1))
        kept_keys = keys.gather(2, chosen[..., None].expand(-1, -1, -1, keys.shape[-1]))
        kept_values = values.gather(2, chosen[..., None].expand(-1, -1, -1, values.shape[-1]))
        kept_pos = token_pos.gather(-1, chosen)
        kept_score = score.expand(-1, kv_heads, -1).gather(-1, chosen)
        self.keys[:, :, :count] = kept_keys
        self.values[:, :, :count] = kept_values
        self.value_norm[:, :, :count] = kept_values.float().abs().sum(dim=-1)
        self.slot_pos[:, :, :count] = kept_pos.masked_fill(overflow, -1)
        self.slot_pos[:, :, count:] = -1
        selectors = self.selectors
        slot_score = torch.zeros(batch, selectors, self.keys.shape[2], device=keys.device)
        slot_score[:, :, :count] = kept_score[:, :selectors]
        if self.accumulated is not None:
            self.accumulated.copy_(slot_score)
        usable = torch.arange(slot_score.shape[-1], device=keys.device) < self.slot_limit[:, :selectors, None]
        rank = rank_slots(slot_score, self.slot_pos[:, :selectors], usable, position, policy.sink_tokens,
                          policy.recent_window)  # fmt: skip
        self.write_slot.copy_(rank.argmin(dim=-1).to(torch.int32).expand(batch, kv_heads))

    def decode(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
        preparation: NewTokenPreparation | None = None,
    ) -> torch.Tensor:
        """Run the fused op for each new token in order; returns ``[B, n, Hq, D]``.

        ``query`` ``[B, Hq, n, D]``; ``keys``/``values`` ``[B, Hkv, n, D]``; ``positions`` ``[B, n]``.
        ``preparation``: the op normalises and rotates ``query`` and ``keys`` (else they come rotated).
        """
        batch = query.shape[0]
        policy = self.policy
        positions = positions.to(torch.int32)
        # ReasonAlloc over a per-step scorer: the op itself moves a slot between heads every
        # `rebalance_every` positions (compacting scorers move slots at their re-selections).
        reallocate_every = policy.rebalance_every if policy.reallocates_heads and not policy.compacting else 0
        outputs = []
        last = query.shape[2] - 1
        for step in range(query.shape[2]):
            if policy.compacting:
                self._before_compacting_step(query[:, :, step], positions[:, step], scale)
            outputs.append(
                decode_step(
                    _rows(query[:, :, step]),
                    _rows(keys[:, :, step]),
                    _rows(values[:, :, step]),
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
                    self.planned_slots,
                    reallocate_every,
                    policy.minimum_budget,
                    *(() if preparation is None else preparation.op_arguments(step, batch)),
                    # The layer's next token reads its state before calling the op (compacting policies).
                    overlap_scoring=self.overlap_scoring and step == last,
                    workspaces=self.workspaces,
                )
            )
        self.token_count.add_(query.shape[2])
        return outputs[0][:, None] if len(outputs) == 1 else torch.stack(outputs, dim=1)

    def _before_compacting_step(self, query: torch.Tensor, position: torch.Tensor, scale: float) -> None:
        """Record the query; when a head has no free slot left, re-select the cache by the
        policy's scores (ReasonAlloc first moves budget between heads): every head keeps its live
        limit less the buffer, so each has ``policy.reserve`` free slots again."""
        window = self.recent_queries.shape[2]
        self.recent_queries[:, :, self.ring_index % window] = query
        self.ring_index += 1
        if self.free_slots == 0:
            observed = self.recent_queries[:, :, : min(window, self.ring_index)]
            score = self.policy.compaction_scores(self.keys, self.slot_pos, observed, scale)
            if self.policy.reallocates_heads:
                self._reallocate_at_selection(score, observed, position - 1, scale)
            count = int(self.slot_limit.max()) - self.policy.reserve
            self._store_best(self.keys.clone(), self.values.clone(), self.slot_pos.clone(), score, position - 1, count)
            self.free_slots = self.policy.reserve
        self.free_slots -= 1

    def _reallocate_at_selection(
        self, score: torch.Tensor, observed: torch.Tensor, position: torch.Tensor, scale: float
    ) -> None:
        """ReasonAlloc's online step for compacting scorers, just before a re-selection: in every
        row, move ``slots_to_move`` slots from the KV head whose last kept tokens draw the least
        attention from the recent queries to the head whose first dropped tokens draw the most,
        if the move gains attention. "Kept" follows the scorer's ranking of each head's tokens.

        ``score`` ``[B, Hkv, S]`` the scorer's importance; ``observed`` ``[B, Hq, W, D]`` the
        recent queries; ``position`` ``[B]`` the newest token's.
        """
        policy = self.policy
        slots = self.keys.shape[2]
        move = policy.slots_to_move(self.layer)
        usable = torch.arange(slots, device=score.device) < self.slot_limit[..., None]
        valid = usable & (self.slot_pos >= 0)
        rank = rank_slots(score, self.slot_pos, usable, position, policy.sink_tokens, policy.recent_window)
        order = torch.where(valid, rank, -torch.inf).argsort(dim=-1, descending=True, stable=True)
        attention = window_attention(self.keys, self.slot_pos, observed, scale).gather(-1, order)
        cumulative = torch.nn.functional.pad(attention.cumsum(dim=-1), (1, 0))  # [B, Hkv, S + 1]: mass of the best k

        def mass_of_best(count: torch.Tensor) -> torch.Tensor:
            return cumulative.gather(-1, count.clamp(0, slots).long()[..., None])[..., 0]

        kept = self.slot_limit - policy.reserve
        loss = mass_of_best(kept) - mass_of_best(kept - move)  # giving up `move` slots
        gain = mass_of_best(kept + move) - mass_of_best(kept)  # receiving `move` slots
        loss = loss.masked_fill(self.slot_limit - move < policy.minimum_budget, torch.inf)
        gain = gain.masked_fill(self.slot_limit + move > slots, -torch.inf)
        rows = torch.arange(score.shape[0], device=score.device)
        donor, recipient = loss.argmin(dim=-1), gain.argmax(dim=-1)
        moves = (donor != recipient) & (gain[rows, recipient] > loss[rows, donor])
        self.slot_limit[rows, donor] -= (moves * move).to(torch.int32)
        self.slot_limit[rows, recipient] += (moves * move).to(torch.int32)

    def kv_bytes(self) -> int:
        """Bytes held by this layer's keys and values."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class LongFlowCache(Cache):
    """A transformers ``Cache`` of ``LongFlowLayer`` s, one per decoder layer, all under one policy
    (and one dict of eager scratch buffers, ``workspaces``: layers of one shape share them)."""

    made_by_generate = False
    """True while the patched ``generate`` decodes into a cache of its own (the caller passed none),
    which the caller sees only through ``return_dict_in_generate``; a cache the caller passes in is
    theirs, even one an earlier call returned."""
    _passed_to_generate = False

    def __init__(self, policy: Policy, num_layers: int):
        self.workspaces: dict = {}
        super().__init__(layers=[LongFlowLayer(policy, layer, self.workspaces) for layer in range(num_layers)])
        self.policy = policy
        # A decode forward calls the layers in order: each one's op joins the scoring pass the one
        # before left beside, and the last runs its own inline, so the forward ends joined.
        for layer in self.layers[:-1]:
            layer.overlap_scoring = True

    @property
    def _is_user_defined(self) -> bool:
        """transformers' mark on a cache passed to ``generate``: the caller holds it after the call,
        so ``generate`` keeps it consistent with the tokens it returns (and reads its stop check on
        the host every step, `longflow_patch.compat.defer_stop_check_on_cuda`). A cache the patched
        ``generate`` made and passed on itself is not the caller's."""
        return self._passed_to_generate and not self.made_by_generate

    @_is_user_defined.setter
    def _is_user_defined(self, passed: bool) -> None:
        self._passed_to_generate = passed

    def kv_bytes(self) -> int:
        """Bytes held by keys and values over all layers."""
        return sum(layer.kv_bytes() for layer in self.layers)
