"""Budget solver: split a total KV-cache budget unevenly over heads (LU-KV) or layers (ReasonAlloc).

Everything here is pure NumPy and knows nothing about models or caches.

LU-KV (:func:`greedy_allocate`)
    Each head ``h`` has a utility curve ``f_h(b)`` measured offline at budgets ``b = 0..n_h - 1``.
    We want integers ``b_h`` with ``sum(b_h) == total`` and ``minimum[h] <= b_h <= n_h - 1`` that
    maximise ``sum(f_h(b_h))``. Each curve is relaxed to its least concave majorant (its upper
    concave envelope ``g_h``, :func:`upper_concave_envelope`); the envelope is piecewise linear with
    integer breakpoints, so it splits into segments of strictly decreasing slope. Taking segments in
    decreasing slope order until the total is reached is the marginal-utility greedy.

    Optimality. For concave curves, greedy on unit marginals is optimal for a separable objective
    under one equality constraint (an exchange argument: any allocation that skips a larger marginal
    for a smaller one improves by swapping them), whatever the sign of the marginals. The envelopes
    are concave, so the greedy allocation ``b`` is optimal for the relaxed problem
    ``max sum(g_h(b_h))``. Every head whose budget lands on a hull vertex has ``g_h(b_h) = f_h(b_h)``;
    only the one segment where the greedy stops can be entered part-way. Hence for every feasible
    integer allocation ``a``::

        sum f_h(a_h) <= sum g_h(a_h) <= sum g_h(b_h) = sum f_h(b_h) + (g_k(b_k) - f_k(b_k))

    where ``k`` is the head whose segment was cut. The allocation is exactly optimal when the curves
    are concave, and otherwise falls short of the optimum by at most the envelope-curve gap of that
    single head at its budget (never more than the largest gap on that one segment).

ReasonAlloc's layer-wise pre-allocation is the same solver over one curve per layer (the layer's
utility with every KV head of it at ``b`` tokens), in tokens per KV head; see
:meth:`longflow_patch.profiles.BudgetProfile.from_curves`.
"""

import operator
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

# When a vectorised pruning pass removes fewer than 1/_PRUNE_STOP of the remaining points, the hull
# is finished by a sequential scan (worst case linear, each pass shrinks the input geometrically).
_PRUNE_STOP = 8


def upper_concave_envelope(curve: ArrayLike) -> np.ndarray:
    """The least concave majorant of a curve sampled at ``b = 0..n-1``.

    The result equals ``curve`` at the vertices of its upper convex hull (the two endpoints always
    among them) and is linear in between, so it is concave, ``>= curve`` everywhere, and the smallest
    such function.

    Args:
        curve: 1-D finite values, at least one.

    Returns:
        float64 array of the same length.
    """
    values = _as_curve(curve, "curve")
    vertices = _hull_vertices(values)
    envelope = np.interp(np.arange(values.size, dtype=np.float64), vertices, values[vertices])
    envelope[vertices] = values[vertices]
    return envelope


def greedy_allocate(
    curves: Sequence[ArrayLike],
    total: int,
    minimum: int | Sequence[int] | None = None,
) -> list[int]:
    """Split ``total`` over heads by marginal utility on the concave envelopes of their curves.

    Args:
        curves: ``curves[h][b]`` is the utility of head ``h`` kept at budget ``b`` (``b = 0..len-1``);
            curves may differ in length and need not be monotone or concave.
        total: the budget to split; the result sums to exactly this.
        minimum: a floor per head (a sequence) or for every head (an int); ``None`` means 0.

    Returns:
        One int per head, ``minimum[h] <= budget[h] <= len(curves[h]) - 1``.

    With a floor ``m_h``, head ``h`` is solved on ``curves[h][m_h:]`` (its envelope is taken there).
    Segments of equal slope go to the lower head index first, so the result is deterministic. See the
    module docstring for the optimality argument and the bound on non-concave curves. Runs in
    ``O(sum(len) log(sum(len)))``: hulls are built with vectorised pruning, segments sorted once.

    Raises:
        ValueError: a curve is empty, not 1-D or not finite; a floor is outside its curve's range;
            ``total`` is below the sum of the floors or above the sum of ``len(curve) - 1``.
    """
    total = operator.index(total)
    arrays = [_as_curve(curve, f"curves[{h}]") for h, curve in enumerate(curves)]
    floors = _floors(minimum, arrays)
    lowest = sum(floors)
    highest = sum(a.size - 1 for a in arrays)
    if total < lowest:
        raise ValueError(f"total {total} is below the sum of the minimum budgets ({lowest})")
    if total > highest:
        raise ValueError(
            f"total {total} exceeds the largest allocation the curves allow ({highest} = sum of len(curve) - 1)"
        )
    extra = total - lowest
    budgets = np.array(floors, dtype=np.int64)
    if extra == 0:
        return budgets.tolist()

    heads, lengths, slopes = [], [], []
    for h, (values, floor) in enumerate(zip(arrays, floors, strict=True)):
        part = values[floor:]
        vertices = _hull_vertices(part)
        widths = np.diff(vertices)
        heads.append(np.full(widths.size, h, dtype=np.int64))
        lengths.append(widths)
        slopes.append(np.diff(part[vertices]) / widths)
    head = np.concatenate(heads)
    length = np.concatenate(lengths)
    # Segments are listed by head, then position; a stable sort on decreasing slope keeps that order
    # among equal slopes (lower head first), and a head's own slopes strictly decrease, so its
    # segments are taken in order and each budget ends on its envelope's prefix.
    order = np.argsort(-np.concatenate(slopes), kind="stable")
    taken = np.cumsum(length[order])
    cut = int(np.searchsorted(taken, extra, side="left"))  # first segment that reaches `extra`
    full = order[:cut]
    budgets += np.rint(np.bincount(head[full], weights=length[full], minlength=len(arrays))).astype(np.int64)
    budgets[head[order[cut]]] += extra - (int(taken[cut - 1]) if cut else 0)
    return budgets.tolist()


def _as_curve(curve: ArrayLike, name: str) -> np.ndarray:
    """``curve`` as a 1-D, non-empty, finite float64 array, or a ValueError naming it."""
    values = np.asarray(curve, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D curve, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} has non-finite values")
    return values


def _floors(minimum: int | Sequence[int] | None, arrays: list[np.ndarray]) -> list[int]:
    """Per-head floors from ``None``, one int or one int per head, each checked against its curve."""
    if minimum is None:
        floors = [0] * len(arrays)
    else:
        try:
            floors = [operator.index(minimum)] * len(arrays)
        except TypeError:
            floors = [operator.index(m) for m in minimum]  # type: ignore[union-attr]
            if len(floors) != len(arrays):
                raise ValueError(f"minimum has {len(floors)} entries for {len(arrays)} curves") from None
    for h, (floor, values) in enumerate(zip(floors, arrays, strict=True)):
        if not 0 <= floor <= values.size - 1:
            raise ValueError(f"minimum[{h}] = {floor} is outside 0..{values.size - 1} (the range of curves[{h}])")
    return floors


def _hull_vertices(values: np.ndarray) -> np.ndarray:
    """Indices of the strict vertices of the upper hull of ``(b, values[b])``, endpoints included.

    A point whose left slope is ``<=`` its right slope lies on or under the chord of its neighbours,
    so it is never a strict vertex: vectorised passes remove all such points at once until few are
    left to remove, then a monotone-chain scan finishes. Consecutive slopes of the result, computed as
    ``diff(values) / diff(index)``, are strictly decreasing.
    """
    index = np.arange(values.size)
    while index.size > 2:
        slopes = np.diff(values[index]) / np.diff(index)
        dent = slopes[:-1] <= slopes[1:]
        dents = int(np.count_nonzero(dent))
        if dents == 0:
            return index
        keep = np.ones(index.size, dtype=bool)
        keep[1:-1] = ~dent
        index = index[keep]
        if dents * _PRUNE_STOP < index.size:
            return _monotone_chain(values, index)
    return index


def _monotone_chain(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain (upper half) over the points ``index``, already sorted by position."""
    xs: list[int] = []
    ys: list[float] = []
    for x, y in zip(index.tolist(), values[index].tolist(), strict=True):
        while len(xs) >= 2 and (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) <= (y - ys[-1]) / (x - xs[-1]):
            xs.pop()
            ys.pop()
        xs.append(x)
        ys.append(y)
    return np.array(xs, dtype=np.int64)
