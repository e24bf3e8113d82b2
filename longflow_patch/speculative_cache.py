"""Caches for speculative decoding: the target's full cache that can be cut back, and the draft's
constant-size LongFlow cache that can undo its last decode steps.

Target (`SpeculativeCache`): one contiguous buffer per layer, preallocated to prompt + new tokens
+ the longest verification, holding every token (nothing is evicted: verification must see the
exact prefix). A verification forward appends its ``T`` tokens; rolling back after a rejection only
sets the length, since later writes overwrite the rejected entries.

Draft (`DraftCache`): a `LongFlowCache` whose decode steps are logged. Each step of a per-step
policy overwrites exactly one slot per KV head (the slot in ``write_slot`` before the step) and
then moves ``write_slot``; the log keeps, per step, that slot's previous key, value, value norm and
position and the previous ``write_slot``. Undoing steps in reverse order restores the cache bit for
bit to the state of a draft that never saw the rejected tokens, at the cost of a few ``[B, Hkv, D]``
copies per step instead of a snapshot of the whole cache or a re-run of the accepted tokens.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longflow_patch.cache import LongFlowCache, LongFlowLayer
from longflow_patch.policies import Policy, ReasonAllocPolicy
from longflow_patch.verify_ops import verify_attention


class SpeculativeLayer(CacheLayerMixin):
    """One layer of the target's full cache.

    Buffers (allocated on the first write): ``keys``, ``values`` ``[B, Hkv, capacity, D]`` in the
    model's dtype; the first ``length`` positions are valid.
    """

    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self.keys = key_states.new_zeros(batch, kv_heads, self.capacity, head_dim)
        self.values = value_states.new_zeros(batch, kv_heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write ``[B, Hkv, n, D]`` keys / values after the valid prefix."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.capacity:
            raise ValueError(f"speculative cache overflow: {end} tokens for a capacity of {self.capacity}")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' interface (an unpatched forward): append, return all valid keys / values."""
        self.append(key_states, value_states)
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def verify(self, query: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, scale: float):
        """Attend ``T`` chained draft tokens over the prefix and themselves, then append them.

        ``query`` ``[B, Hq, T, D]``; ``key_states`` / ``value_states`` ``[B, Hkv, T, D]``.
        Returns ``[B, T, Hq, D]`` (the layout of transformers' attention functions).
        """
        batch = query.shape[0]
        prefix_len = torch.full((batch,), self.length, dtype=torch.int32, device=query.device)
        out = verify_attention(
            query,
            self.keys[:, :, : self.length],
            self.values[:, :, : self.length],
            prefix_len,
            key_states,
            value_states,
            None,
            scale,
        )
        self.append(key_states, value_states)
        return out.transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity


class SpeculativeCache(Cache):
    """The target model's full cache for `speculative_generate`, with `rollback`.

    ``draft``: an optional `DraftCache` of the same model (the self-draft), prefilled from the same
    prompt forward, so the prompt is run once for both.
    """

    def __init__(self, num_layers: int, capacity: int, draft: "DraftCache | None" = None):
        super().__init__(layers=[SpeculativeLayer(capacity) for _ in range(num_layers)])
        self.draft = draft

    def rollback(self, length: int) -> None:
        """Keep the first ``length`` tokens of every layer (drop rejected draft tokens)."""
        for layer in self.layers:
            layer.length = min(layer.length, length)


class DraftLayer(LongFlowLayer):
    """A `LongFlowLayer` that logs what each decode step overwrites, so steps can be undone."""

    def __init__(self, policy: Policy, layer: int = 0):
        super().__init__(policy, layer)
        self.undo_log: list[tuple[torch.Tensor, ...]] = []

    def decode(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """`LongFlowLayer.decode`, one token at a time, logging each step; returns ``[B, n, Hq, D]``."""
        outputs = []
        for step in range(query.shape[2]):
            one = slice(step, step + 1)
            self.undo_log.append(self._overwritten())
            outputs.append(
                super().decode(query[:, :, one], keys[:, :, one], values[:, :, one], positions[:, one], scale)
            )
        return torch.cat(outputs, dim=1)

    def _overwritten(self) -> tuple[torch.Tensor, ...]:
        """What the next step replaces: ``write_slot`` ``[B, Hkv]`` and that slot's key and value
        ``[B, Hkv, 1, D]``, value norm and position ``[B, Hkv, 1]``."""
        slot = self.write_slot.long()[..., None]
        rows = slot[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        return (
            self.write_slot.clone(),
            self.keys.gather(2, rows),
            self.values.gather(2, rows),
            self.value_norm.gather(2, slot),
            self.slot_pos.gather(2, slot),
        )

    def rollback(self, steps: int) -> None:
        """Undo the last ``steps`` logged decode steps, newest first."""
        for _ in range(steps):
            write_slot, keys, values, value_norm, slot_pos = self.undo_log.pop()
            slot = write_slot.long()[..., None]
            rows = slot[..., None].expand_as(keys)
            self.keys.scatter_(2, rows, keys)
            self.values.scatter_(2, rows, values)
            self.value_norm.scatter_(2, slot, value_norm)
            self.slot_pos.scatter_(2, slot, slot_pos)
            self.write_slot.copy_(write_slot)
        self.token_count.sub_(steps)


class DraftCache(LongFlowCache):
    """The draft's constant-size cache: a `LongFlowCache` of `DraftLayer` s.

    Only per-step policies without running state qualify (LongFlow, StreamingLLM, full): their
    decode step changes nothing but the one slot and ``write_slot`` that the log restores.
    """

    def __init__(self, policy: Policy, num_layers: int):
        if policy.accumulate or not policy.compileable or isinstance(policy, ReasonAllocPolicy):
            raise ValueError(f"policy {policy.name!r} keeps state across steps; a draft cache cannot undo its steps")
        Cache.__init__(self, layers=[DraftLayer(policy, layer) for layer in range(num_layers)])
        self.policy = policy

    def rollback(self, steps: int) -> None:
        """Undo the last ``steps`` decode steps of every layer."""
        if steps:
            for layer in self.layers:
                layer.rollback(steps)

    def commit(self) -> None:
        """Forget the undo log: the steps so far are accepted."""
        for layer in self.layers:
            layer.undo_log.clear()
