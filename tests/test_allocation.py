"""Budget solvers: envelope shape, greedy optimality (and its bound), exact sums, errors, speed."""

import time

import numpy as np
import pytest

from longflow_patch.allocation import greedy_allocate, upper_concave_envelope

TOL = 1e-9


def brute_force_best(curves: list[np.ndarray], total: int, floors: list[int]) -> float:
    """Best ``sum(curve[b])`` over all integer allocations summing to ``total`` (dynamic programming)."""
    best = {0: 0.0}
    for curve, floor in zip(curves, floors, strict=True):
        reached: dict[int, float] = {}
        for spent, value in best.items():
            for b in range(floor, curve.size):
                if spent + b <= total:
                    reached[spent + b] = max(reached.get(spent + b, -np.inf), value + curve[b])
        best = reached
    return best[total]


def value(curves: list[np.ndarray], budgets: list[int]) -> float:
    return float(sum(curve[b] for curve, b in zip(curves, budgets, strict=True)))


def random_concave(rng: np.random.Generator, length: int) -> np.ndarray:
    """A concave curve: decreasing increments (some negative), random start."""
    increments = np.sort(rng.normal(0.5, 1.0, size=length - 1))[::-1]
    return rng.normal() + np.concatenate([[0.0], np.cumsum(increments)])


def check_allocation(curves: list[np.ndarray], total: int, floors: list[int], budgets: list[int]) -> None:
    assert all(isinstance(b, int) for b in budgets)
    assert sum(budgets) == total
    for curve, floor, b in zip(curves, floors, budgets, strict=True):
        assert floor <= b <= curve.size - 1


def random_case(rng: np.random.Generator, concave: bool):
    """Small curves of different lengths, random floors, and every feasible total."""
    heads = int(rng.integers(1, 5))
    lengths = rng.integers(1, 8, size=heads)
    curves = [random_concave(rng, n) if concave else rng.normal(size=n) for n in lengths]
    floors = [int(rng.integers(0, n)) if rng.random() < 0.3 else 0 for n in lengths]
    return curves, floors, range(sum(floors), int(sum(lengths - 1)) + 1)


def least_concave_majorant(curve: np.ndarray) -> np.ndarray:
    """Reference envelope: at each b the highest chord between points on either side of b."""
    n = curve.size
    envelope = curve.astype(np.float64).copy()
    for b in range(n):
        for left in range(b + 1):
            for right in range(b, n):
                if left < right:
                    chord = curve[left] + (curve[right] - curve[left]) * (b - left) / (right - left)
                    envelope[b] = max(envelope[b], chord)
    return envelope


@pytest.mark.parametrize("seed", range(20))
def test_envelope_is_the_least_concave_majorant(seed):
    rng = np.random.default_rng(seed)
    curve = rng.normal(size=int(rng.integers(1, 30))) * 10 ** rng.uniform(-3, 3)
    envelope = upper_concave_envelope(curve)
    scale = max(1.0, float(np.abs(curve).max()))
    assert envelope.shape == curve.shape
    assert np.all(envelope >= curve - TOL * scale)
    assert envelope[0] == curve[0] and envelope[-1] == curve[-1]
    assert np.all(np.diff(envelope, 2) <= TOL * scale)
    np.testing.assert_allclose(envelope, least_concave_majorant(curve), rtol=0, atol=TOL * scale)


def test_envelope_of_a_concave_curve_is_the_curve():
    curve = np.sqrt(np.arange(50.0))
    np.testing.assert_array_equal(upper_concave_envelope(curve), curve)
    np.testing.assert_array_equal(upper_concave_envelope([2.0]), [2.0])
    np.testing.assert_array_equal(upper_concave_envelope([0.0, 3.0, 3.0, 3.0]), [0.0, 3.0, 3.0, 3.0])


def test_envelope_bridges_dents_and_convex_stretches():
    np.testing.assert_allclose(upper_concave_envelope([0.0, 0.0, 4.0, 1.0]), [0.0, 2.0, 4.0, 1.0])
    np.testing.assert_allclose(upper_concave_envelope([0.0, 1.0, 4.0, 9.0]), [0.0, 3.0, 6.0, 9.0])
    # a cascade: the last point lifts the chord over every earlier interior point
    curve = np.log1p(np.arange(200.0))
    curve[-1] = 1e6
    np.testing.assert_allclose(upper_concave_envelope(curve), np.linspace(0.0, 1e6, 200))


@pytest.mark.parametrize("seed", range(40))
def test_greedy_is_optimal_on_concave_curves(seed):
    rng = np.random.default_rng(seed)
    curves, floors, totals = random_case(rng, concave=True)
    for total in totals:
        budgets = greedy_allocate(curves, total, floors)
        check_allocation(curves, total, floors, budgets)
        assert value(curves, budgets) == pytest.approx(brute_force_best(curves, total, floors), abs=TOL)


@pytest.mark.parametrize("seed", range(40))
def test_greedy_on_non_concave_curves_is_within_the_documented_bound(seed):
    rng = np.random.default_rng(1000 + seed)
    curves, floors, totals = random_case(rng, concave=False)
    envelopes = [upper_concave_envelope(curve[floor:]) for curve, floor in zip(curves, floors, strict=True)]
    for total in totals:
        budgets = greedy_allocate(curves, total, floors)
        check_allocation(curves, total, floors, budgets)
        shifted = [b - floor for b, floor in zip(budgets, floors, strict=True)]
        # optimal for the relaxed problem on the envelopes
        relaxed = value(envelopes, shifted)
        assert relaxed == pytest.approx(brute_force_best(envelopes, total - sum(floors), [0] * len(curves)), abs=TOL)
        # on the curves: short of the optimum by at most the gap of the one head stopped inside a segment
        gaps = [env[s] - curve[b] for env, curve, s, b in zip(envelopes, curves, shifted, budgets, strict=True)]
        assert sum(gap > TOL for gap in gaps) <= 1
        best = brute_force_best(curves, total, floors)
        assert value(curves, budgets) <= best + TOL
        assert best - value(curves, budgets) <= max(gaps) + TOL


def test_the_bound_is_reached_when_the_greedy_stops_inside_a_segment():
    # the envelope of [0, 0, 10] is linear (slope 5): one slot lands in the dent, worth 0 instead of 5
    curves = [np.array([0.0, 0.0, 10.0]), np.array([0.0, 4.0])]
    budgets = greedy_allocate(curves, 1)
    assert budgets == [1, 0]
    assert brute_force_best(curves, 1, [0, 0]) - value(curves, budgets) == pytest.approx(4.0)
    assert upper_concave_envelope(curves[0])[1] - curves[0][1] == pytest.approx(5.0)  # the bound: 5 >= 4


def test_edges_of_the_feasible_range():
    curves = [np.arange(4.0), np.zeros(1), -np.arange(3.0)]
    assert greedy_allocate(curves, 0) == [0, 0, 0]
    assert greedy_allocate(curves, 5) == [3, 0, 2]
    assert greedy_allocate(curves, 4, minimum=[0, 0, 1]) == [3, 0, 1]
    assert greedy_allocate([], 0) == []


def test_non_monotone_curves_still_spend_the_exact_total():
    # negative marginals must be taken too when the total demands them; equal slopes go to head 0
    assert greedy_allocate([[0.0, -1.0, -2.0], [0.0, 5.0, 4.0]], 2) == [1, 1]
    assert greedy_allocate([[0.0, -1.0, -2.0], [0.0, 5.0, 4.0]], 1) == [0, 1]
    assert greedy_allocate([[0.0, -1.0, -2.0], [0.0, 5.0, 4.0]], 4) == [2, 2]


def test_ties_go_to_the_lower_head_first():
    line = [0.0, 1.0, 2.0, 3.0]
    assert greedy_allocate([line, line], 3) == [3, 0]
    assert greedy_allocate([line, line], 5) == [3, 2]
    assert greedy_allocate([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], 2) == [1, 1, 0]
    rng = np.random.default_rng(0)
    curves = [np.round(rng.random(20).cumsum(), 1) for _ in range(6)]
    assert greedy_allocate(curves, 40) == greedy_allocate(curves, 40)


def test_curves_of_different_lengths_respect_their_ranges():
    curves = [np.arange(2.0) * 10, np.arange(6.0), np.arange(4.0) * 3]
    assert greedy_allocate(curves, 6) == [1, 2, 3]
    assert greedy_allocate(curves, 9) == [1, 5, 3]


def test_scalar_minimum_equals_per_head_minimum():
    rng = np.random.default_rng(3)
    curves = [rng.normal(size=12) for _ in range(5)]
    assert greedy_allocate(curves, 30, 2) == greedy_allocate(curves, 30, [2] * 5)
    assert min(greedy_allocate(curves, 10, 2)) == 2


@pytest.mark.parametrize(
    ("curves", "total", "minimum", "message"),
    [
        ([[0.0, 1.0], [0.0, 1.0, 2.0]], 4, None, "exceeds the largest allocation"),
        ([[0.0, 1.0], [0.0, 1.0, 2.0]], 2, [1, 2], "below the sum of the minimum"),
        ([[0.0, 1.0], [0.0, 1.0, 2.0]], -1, None, "below the sum of the minimum"),
        ([[0.0, 1.0], [0.0, 1.0, 2.0]], 2, [0, 3], r"minimum\[1\] = 3 is outside 0..2"),
        ([[0.0, 1.0], [0.0, 1.0, 2.0]], 2, -1, r"minimum\[0\] = -1"),
        ([[0.0, 1.0], [0.0, 1.0, 2.0]], 2, [0], "minimum has 1 entries for 2 curves"),
        ([[0.0, 1.0], []], 1, None, r"curves\[1\] must be a non-empty 1-D curve"),
        ([[0.0, np.nan]], 1, None, r"curves\[0\] has non-finite values"),
        ([[[0.0, 1.0]]], 1, None, r"curves\[0\] must be a non-empty 1-D curve"),
    ],
)
def test_errors(curves, total, minimum, message):
    with pytest.raises(ValueError, match=message):
        greedy_allocate(curves, total, minimum)


def test_total_must_be_an_integer():
    with pytest.raises(TypeError):
        greedy_allocate([[0.0, 1.0]], 1.0)


def test_large_problem_is_fast_and_optimal():
    rng = np.random.default_rng(0)
    heads, length, total = 1000, 4096, 100_000
    noisy = np.cumsum(rng.random((heads, length)), axis=1) + rng.normal(size=(heads, length))
    start = time.perf_counter()
    budgets = greedy_allocate(list(noisy), total)
    assert time.perf_counter() - start < 2.0
    assert sum(budgets) == total

    # concave curves: optimal iff no unit can move to a strictly larger marginal (exchange argument)
    concave = np.log1p(np.arange(length, dtype=np.float64))[None, :] * rng.uniform(0.1, 10.0, size=(heads, 1))
    budgets = np.array(greedy_allocate(list(concave), total))
    rows = np.arange(heads)
    gain = np.where(
        budgets < length - 1, concave[rows, np.minimum(budgets + 1, length - 1)] - concave[rows, budgets], -np.inf
    )
    loss = np.where(budgets > 0, concave[rows, budgets] - concave[rows, np.maximum(budgets - 1, 0)], np.inf)
    assert gain.max() <= loss.min() + TOL
