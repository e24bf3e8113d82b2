"""Static-shape draft trees: top-k at each depth (LongSpec's beam tree).

A tree of widths ``(w1, ..., wD)`` holds ``w_d`` nodes at depth ``d``, numbered depth by depth.
Depth 1 takes the draft's ``w1`` most likely tokens after the root (the last accepted token);
depth ``d + 1`` takes the ``w_{d+1}`` most likely (node, token) extensions of depth ``d``'s nodes,
ranked by the draft's log-probability of the whole path. The shape (nodes per depth) is fixed, only
which node hangs off which is data, so a round compiles to static shapes; the target verifies all
nodes in one forward under the tree mask (each node sees its ancestors and itself). Widths of 1 at
every depth are a chain.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    """Nodes per depth: ``widths[d - 1]`` nodes at depth ``d``."""

    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.widths or any(not isinstance(width, int) or width < 1 for width in self.widths):
            raise ValueError(f"a draft tree needs one width >= 1 per depth, got {self.widths!r}")

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def nodes(self) -> int:
        return sum(self.widths)

    @property
    def fed(self) -> int:
        """Nodes the draft reads (all but the deepest level's): the first ``fed`` node indices."""
        return self.nodes - self.widths[-1]

    @property
    def is_chain(self) -> bool:
        return all(width == 1 for width in self.widths)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Index of each depth's first node."""
        return tuple(sum(self.widths[:depth]) for depth in range(self.depth))

    @property
    def node_depths(self) -> tuple[int, ...]:
        """Depth of each node (1 for the root's children)."""
        return tuple(depth for depth, width in enumerate(self.widths, 1) for _ in range(width))

    def prefix(self, depth: int) -> "DraftTree":
        """The tree cut to its first ``depth`` levels."""
        return DraftTree(self.widths[:depth])


def expand(log_probs: torch.Tensor, path_log_probs: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """The ``width`` best extensions of the previous depth's nodes.

    ``log_probs`` ``[w, V]``: the draft's next-token log-probabilities at each of the ``w`` nodes;
    ``path_log_probs`` ``[w]``: each node's path log-probability. Returns the new nodes' tokens
    ``[width]`` int64, their parents ``[width]`` int64 (indices into the ``w`` nodes) and path
    log-probabilities ``[width]``.
    """
    vocab = log_probs.shape[-1]
    best = (path_log_probs[:, None] + log_probs).flatten().topk(width)
    return best.indices % vocab, best.indices // vocab, best.values


def accepted_path(picks: list[int], tokens: list[int], parents: list[int]) -> list[int]:
    """The nodes kept, root side first: from the root, descend to the child whose token is the
    target's pick at the current node, until no child holds it.

    ``picks``: the target's token at the root (index 0) and at each node ``i`` (index ``i + 1``);
    ``tokens`` / ``parents``: each node's token and parent node (-1: the root).
    """
    children: dict[tuple[int, int], int] = {}
    for node, key in enumerate(zip(parents, tokens, strict=True)):
        children.setdefault(key, node)
    path, node = [], -1
    while (child := children.get((node, picks[node + 1]))) is not None:
        path.append(child)
        node = child
    return path
