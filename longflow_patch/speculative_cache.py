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
from longflow_patch.ops import NewTokenPreparation
from longflow_patch.policies import Policy
from longflow_patch.verify_ops import verify_attention


class SpeculativeLayer(CacheLayerMixin):
    """One layer of the target's full cache.

    Buffers (allocated on the first write, at fixed addresses): ``keys``, ``values``
    ``[B, Hkv, capacity, D]`` in the model's dtype; ``length`` a 0-d int64 tensor, the number of
    valid positions. Verification keeps static shapes (the op masks past ``length``), so a
    verification forward of a fixed ``T`` can be captured in a CUDA graph.
    """

    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.prefilled = False
        self.length: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self.keys = key_states.new_zeros(batch, kv_heads, self.capacity, head_dim)
        self.values = value_states.new_zeros(batch, kv_heads, self.capacity, value_states.shape[-1])
        self.length = torch.zeros((), dtype=torch.int64, device=key_states.device)
        if not torch.compiler.is_compiling():
            for buffer in (self.keys, self.values, self.length):
                torch._dynamo.mark_static_address(buffer)
        self.is_initialized = True

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write ``[B, Hkv, n, D]`` keys / values after the valid prefix (the caller keeps the
        total within ``capacity``)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        index = self.length + torch.arange(key_states.shape[2], device=self.keys.device)
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        self.length.add_(key_states.shape[2])
        self.prefilled = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' interface (an unpatched forward): append, return all valid keys / values."""
        self.append(key_states, value_states)
        length = int(self.length)
        return self.keys[:, :, :length], self.values[:, :, :length]

    def verify(self, query: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, scale: float,
               draft_mask: torch.Tensor | None = None):  # fmt: skip
        """Attend ``T`` draft tokens over the prefix and themselves, then append them.

        ``query`` ``[B, Hq, T, D]``; ``key_states`` / ``value_states`` ``[B, Hkv, T, D]``;
        ``draft_mask`` ``[T, T]`` bool (a draft tree's; None: a chain, causal).
        Returns ``[B, T, Hq, D]`` (the layout of transformers' attention functions).
        """
        prefix_len = self.length.to(torch.int32).expand(query.shape[0]).contiguous()
        # Written before the attention reads the buffers (it reads only the first prefix_len slots,
        # so the result is the same). Under torch.compile a read of a buffer's old value after
        # its write, in the functional graph, keeps inductor from writing in place: it copies the
        # whole buffer and copies it back (tests/test_compiled_cache_writes.py).
        self.append(key_states, value_states)
        out = verify_attention(query, self.keys, self.values, prefix_len, key_states, value_states, draft_mask, scale)
        return out.transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int | torch.Tensor]:
        """Mask over the new tokens only, at offset ``length`` (as `LongFlowLayer`): verification
        reads no mask, and a mask shape that never changes keeps compiled steps static."""
        return query_length, self.length if self.prefilled else 0

    def get_seq_length(self) -> int | torch.Tensor:
        return self.length if self.prefilled else 0

    def get_max_length(self) -> int:
        return self.capacity


class SpeculativeCache(Cache):
    """The target model's full cache for `speculative_generate`, with `rollback`.

    ``draft``: an optional `DraftCache` of the same model (the self-draft), prefilled from the same
    prompt forward, so the prompt is run once for both. ``draft_mask``: the ``[T, T]`` bool mask of
    the next verification's draft tokens (a draft tree's), or None for a chain.
    """

    def __init__(self, num_layers: int, capacity: int, draft: "DraftCache | None" = None):
        super().__init__(layers=[SpeculativeLayer(capacity) for _ in range(num_layers)])
        self.draft = draft
        self.draft_mask: torch.Tensor | None = None

    def rollback(self, length: int) -> None:
        """Keep the first ``length`` tokens of every layer (drop rejected draft tokens)."""
        for layer in self.layers:
            layer.length.fill_(length)

    def keep(self, start: int, rows: list[int]) -> None:
        """After a verification that appended its tokens at ``start``: keep its first token (the
        root) and its tokens ``rows`` (increasing; a draft tree's accepted path), moved to follow the
        root in every layer, and drop the rest."""
        if rows != list(range(1, len(rows) + 1)):
            device = self.layers[0].keys.device
            source = torch.tensor([start + row for row in rows], device=device)
            moved = torch.arange(start + 1, start + 1 + len(rows), device=device)
            for layer in self.layers:
                layer.keys.index_copy_(2, moved, layer.keys.index_select(2, source))
                layer.values.index_copy_(2, moved, layer.values.index_select(2, source))
        self.rollback(start + 1 + len(rows))


class DraftLayer(LongFlowLayer):
    """A `LongFlowLayer` that logs what each decode step overwrites, so steps can be undone.

    The log is a ring of the last ``max_steps`` steps, preallocated at fixed addresses and filled
    at a device-side index, so a compiled draft step replayed as a CUDA graph logs like an eager one:
    ``log_slot`` ``[N, B, Hkv]`` int32 (``write_slot`` before the step), ``log_keys`` /
    ``log_values`` ``[N, B, Hkv, D]``, ``log_norm`` ``[N, B, Hkv]`` float32, ``log_pos``
    ``[N, B, Hkv]`` int32 (the overwritten slot's contents) and ``log_len`` (0-d int64, steps since
    the last commit).
    """

    def __init__(self, policy: Policy, layer: int, max_steps: int, workspaces: dict | None = None):
        super().__init__(policy, layer, workspaces)
        self.max_steps = max_steps
        self.log_len: torch.Tensor | None = None

    def prefill(self, query, keys, values, is_token, positions, scale) -> None:
        """`LongFlowLayer.prefill`, then an empty log (allocated once, like the slots)."""
        super().prefill(query, keys, values, is_token, positions, scale)
        if self.log_len is None:
            steps, (batch, kv_heads, _, head_dim) = self.max_steps, self.keys.shape
            self.log_slot = self.write_slot.new_zeros(steps, batch, kv_heads)
            self.log_keys = self.keys.new_zeros(steps, batch, kv_heads, head_dim)
            self.log_values = self.values.new_zeros(steps, batch, kv_heads, head_dim)
            self.log_norm = self.value_norm.new_zeros(steps, batch, kv_heads)
            self.log_pos = self.slot_pos.new_zeros(steps, batch, kv_heads)
            self.log_len = torch.zeros((), dtype=torch.int64, device=self.keys.device)
            for buffer in (self.log_slot, self.log_keys, self.log_values, self.log_norm, self.log_pos, self.log_len):
                torch._dynamo.mark_static_address(buffer)
        self.log_len.zero_()

    def decode(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
        preparation: NewTokenPreparation | None = None,
    ) -> torch.Tensor:
        """`LongFlowLayer.decode`, one token at a time, logging each step; returns ``[B, n, Hq, D]``."""
        outputs = []
        for step in range(query.shape[2]):
            one = slice(step, step + 1)
            self._record()
            token = None if preparation is None else preparation.tokens(one)
            outputs.append(
                super().decode(query[:, :, one], keys[:, :, one], values[:, :, one], positions[:, one], scale, token)
            )
        return torch.cat(outputs, dim=1)

    def _record(self) -> None:
        """Log what the next step replaces: ``write_slot`` and that slot's key, value, norm, position."""
        slot = self.write_slot.long()[..., None]
        rows = slot[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        index = self.log_len.remainder(self.max_steps).view(1)
        self.log_slot.index_copy_(0, index, self.write_slot[None])
        self.log_keys.index_copy_(0, index, self.keys.gather(2, rows).permute(2, 0, 1, 3))
        self.log_values.index_copy_(0, index, self.values.gather(2, rows).permute(2, 0, 1, 3))
        self.log_norm.index_copy_(0, index, self.value_norm.gather(2, slot).permute(2, 0, 1))
        self.log_pos.index_copy_(0, index, self.slot_pos.gather(2, slot).permute(2, 0, 1))
        self.log_len.add_(1)

    def rollback(self, steps: int, logged: int) -> None:
        """Undo the last ``steps`` of the ``logged`` steps in the log, newest first."""
        for step in range(logged - 1, logged - 1 - steps, -1):
            entry = step % self.max_steps
            slot = self.log_slot[entry].long()[..., None]
            rows = slot[..., None].expand(-1, -1, -1, self.keys.shape[-1])
            self.keys.scatter_(2, rows, self.log_keys[entry][:, :, None])
            self.values.scatter_(2, rows, self.log_values[entry][:, :, None])
            self.value_norm.scatter_(2, slot, self.log_norm[entry][..., None])
            self.slot_pos.scatter_(2, slot, self.log_pos[entry][..., None])
            self.write_slot.copy_(self.log_slot[entry])
        self.token_count.sub_(steps)
        self.log_len.sub_(steps)


class DraftCache(LongFlowCache):
    """The draft's constant-size cache: a `LongFlowCache` of `DraftLayer` s whose logs hold up to
    ``max_steps`` decode steps between commits.

    Only per-step policies without running state qualify (LongFlow, StreamingLLM, full): their
    decode step changes nothing but the one slot and ``write_slot`` that the log restores.
    """

    def __init__(self, policy: Policy, num_layers: int, max_steps: int):
        if policy.accumulate or not policy.compileable:
            raise ValueError(f"policy {policy.name!r} keeps state across steps; a draft cache cannot undo its steps")
        self.workspaces: dict = {}
        layers = [DraftLayer(policy, layer, max_steps, self.workspaces) for layer in range(num_layers)]
        Cache.__init__(self, layers=layers)
        self.policy = policy

    def rollback(self, steps: int, logged: int | None = None) -> None:
        """Undo the last ``steps`` decode steps since the last commit, in every layer.

        ``logged``: the steps since the last commit, when the caller has counted them (saves a
        device-to-host sync); read from the log otherwise.
        """
        if steps:
            logged = int(self.layers[0].log_len) if logged is None else logged
            if steps > min(logged, self.layers[0].max_steps):
                raise ValueError(f"cannot undo {steps} steps: {logged} since the last commit, the log holds "
                                 f"{self.layers[0].max_steps}")  # fmt: skip
            for layer in self.layers:
                layer.rollback(steps, logged)

    def commit(self) -> None:
        """Empty the log: the steps so far are accepted."""
        for layer in self.layers:
            layer.log_len.zero_()
