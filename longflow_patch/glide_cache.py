"""The GLIDE draft's own constant-size cache: sink tokens, a sliding window, and a tree buffer.

Accepted tokens live in ``sink_tokens + window + 2`` slots: position ``p`` goes to slot ``p`` if it is
a sink, else to slot ``sink_tokens + (p - sink_tokens) % (window + 2)``, and ``slot_pos`` records
which position each slot holds. A query at position ``p`` sees the sinks and the positions in
``(p - window, p]``. Two spare ring slots keep a window intact while a round writes up to two
positions past its first query (the pending tokens); positions are never written out of order, so
the cache needs no rollback: the round writes only accepted tokens here.

Draft tokens of the current round (a chain, or a tree's nodes, several at one position) go to the
tree buffer, whose visibility the round gives per query (each node sees its ancestors and itself).
After verification, `commit` copies the accepted nodes' keys and values to their positions.

Buffers (fixed addresses, so a compiled round can be a CUDA graph): ``keys`` / ``values``
``[1, Hkv, slots, D]``, ``slot_pos`` ``[slots]`` int64 (-1: empty), ``tree_keys`` /
``tree_values`` ``[1, Hkv, nodes, D]``.
"""

import torch

from longflow_patch.glide import GlideConfig

SPARE_SLOTS = 2


class GlideCache:
    """The draft's cache for one `speculative_generate` call (batch size 1)."""

    def __init__(self, config: GlideConfig, tree_nodes: int, dtype: torch.dtype, device: torch.device):
        self.sinks, self.window = config.sink_tokens, config.window
        self.ring = config.window + SPARE_SLOTS
        shape = (1, config.num_key_value_heads, self.sinks + self.ring, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((shape[2],), -1, dtype=torch.int64, device=device)
        tree_shape = (1, config.num_key_value_heads, max(tree_nodes, 1), config.head_dim)
        self.tree_keys = torch.zeros(tree_shape, dtype=dtype, device=device)
        self.tree_values = torch.zeros(tree_shape, dtype=dtype, device=device)
        for buffer in (self.keys, self.values, self.slot_pos, self.tree_keys, self.tree_values):
            torch._dynamo.mark_static_address(buffer)

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of each position ``[n]`` int64."""
        return torch.where(positions < self.sinks, positions, self.sinks + (positions - self.sinks) % self.ring)

    def write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store accepted tokens' ``[1, Hkv, n, D]`` keys / values at their positions ``[n]`` (distinct
        slots: at most ``window + 2`` positions past the sinks)."""
        slots = self.slots(positions)
        self.keys.index_copy_(2, slots, keys)
        self.values.index_copy_(2, slots, values)
        self.slot_pos.index_copy_(0, slots, positions)

    def visible(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n, slots]`` bool: the slots a query at each of ``positions`` ``[n]`` sees."""
        held, query = self.slot_pos[None], positions[:, None]
        return (held >= 0) & (held <= query) & ((held < self.sinks) | (held > query - self.window))

    def write_tree(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Store draft nodes' ``[1, Hkv, n, D]`` keys / values at tree slots ``start..start + n``."""
        self.tree_keys[:, :, start : start + keys.shape[2]] = keys
        self.tree_values[:, :, start : start + keys.shape[2]] = values

    def commit(self, nodes: list[int], first_position: int) -> None:
        """Copy tree nodes ``nodes`` (an accepted path, root side first) to positions
        ``first_position, first_position + 1, ...``."""
        if nodes:
            index = torch.tensor(nodes, device=self.keys.device)
            positions = torch.arange(first_position, first_position + len(nodes), device=self.keys.device)
            self.write(self.tree_keys.index_select(2, index), self.tree_values.index_select(2, index), positions)
