"""Budget profiles: exact JSON round-trips, validation of inconsistent files, re-solving at other totals."""

import json

import numpy as np
import pytest

from longflow_patch.allocation import greedy_allocate
from longflow_patch.profiles import BudgetProfile

LAYERS, HEADS = 3, 2


def lukv_profile(total: int = 40, minimum: int = 1) -> BudgetProfile:
    rng = np.random.default_rng(0)
    curves = [[np.cumsum(rng.random(int(rng.integers(8, 30)))) for _ in range(HEADS)] for _ in range(LAYERS)]
    curves[0][0][3] = 0.1 + 0.2  # a float whose shortest repr has many digits
    return BudgetProfile.from_curves(
        "lukv", "org/tiny-model", curves, total, HEADS, minimum, {"prompts": 4, "tokens": [512, 1024]}, 64, "rkv"
    )


def reasonalloc_profile(total: int = 48) -> BudgetProfile:
    """Concave layer curves of different steepness and length (per-head budgets 0..len-1)."""
    curves = [np.log1p(np.arange(length)) * weight for length, weight in ((200, 0.3), (260, 0.7), (230, 0.5))]
    return BudgetProfile.from_curves("reasonalloc", "org/tiny-model", curves, total, HEADS, minimum=2)


def test_lukv_profile_matches_the_solver():
    profile = lukv_profile()
    flat = [curve for layer in profile.curves for curve in layer]
    assert [b for row in profile.head_budgets for b in row] == greedy_allocate(flat, 40, 1)
    assert profile.layer_budgets == [sum(row) for row in profile.head_budgets]
    assert profile.total_budget == 40 == sum(profile.layer_budgets)
    assert profile.head_budget_table() == profile.head_budgets


def test_reasonalloc_profile_solves_layer_curves_and_splits_layers_evenly_over_heads():
    profile = reasonalloc_profile(96)
    per_head = greedy_allocate(profile.curves, 96 // HEADS, 2)
    assert profile.layer_budgets == [b * HEADS for b in per_head] and sum(profile.layer_budgets) == 96
    assert per_head[1] > per_head[2] > per_head[0]  # the steepest layer gets the most
    assert profile.head_budgets is None
    assert profile.head_budget_table() == [[b, b] for b in per_head]


@pytest.mark.parametrize("method", ["lukv", "reasonalloc"])
def test_fixed_profiles_solve_to_their_table(method):
    table = [[5, 9], [3, 3], [12, 1]] if method == "lukv" else [[5, 5], [3, 3], [12, 12]]
    profile = BudgetProfile.fixed(table, "hand-set", method)
    assert profile.method == method and profile.head_budget_table() == table


def test_a_reasonalloc_table_gives_a_layers_heads_one_budget():
    with pytest.raises(ValueError, match="every KV head of a layer the same budget"):
        BudgetProfile.fixed([[5, 9]], "hand-set", "reasonalloc")


@pytest.mark.parametrize("make", [lukv_profile, reasonalloc_profile])
def test_round_trip_is_exact(make, tmp_path):
    profile = make()
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = BudgetProfile.load(path)
    assert loaded == profile
    assert loaded.to_json() == path.read_text()


def test_json_is_readable_with_sorted_keys():
    text = lukv_profile().to_json()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["format_version"] == 2
    assert data["curves"][0][0][3] == 0.1 + 0.2
    # one line per curve and per budget row, not one line per number
    lines = {line.strip().rstrip(",") for line in text.splitlines()}
    assert all(json.dumps(curve) in lines for layer in data["curves"] for curve in layer)
    assert all(json.dumps(row) in lines for row in data["head_budgets"])
    assert len(text.splitlines()) < 40


def test_golden_file():
    profile = BudgetProfile.from_curves(
        "lukv", "org/name", [[[0.0, 0.5, 0.7], [0.0, 0.9, 1.0]]], 3, 2, metadata={"calibration": "4 prompts"}
    )
    assert profile.to_json() == (
        "{\n"
        '  "context_budget": null,\n'
        '  "curves": [\n'
        "    [\n"
        "      [0.0, 0.5, 0.7],\n"
        "      [0.0, 0.9, 1.0]\n"
        "    ]\n"
        "  ],\n"
        '  "format_version": 2,\n'
        '  "head_budgets": [\n'
        "    [2, 1]\n"
        "  ],\n"
        '  "layer_budgets": [3],\n'
        '  "metadata": {\n'
        '    "calibration": "4 prompts"\n'
        "  },\n"
        '  "method": "lukv",\n'
        '  "minimum": 0,\n'
        '  "model": "org/name",\n'
        '  "num_kv_heads": 2,\n'
        '  "num_layers": 1,\n'
        '  "scorer": null,\n'
        '  "total_budget": 3\n'
        "}\n"
    )


def valid_lukv() -> dict:
    return json.loads(lukv_profile().to_json())


def valid_reasonalloc() -> dict:
    return json.loads(reasonalloc_profile().to_json())


def edit(data: dict, path: tuple, new) -> dict:
    """``data`` with the item at ``path`` (keys / indices) replaced, or deleted when ``new`` is ``...``."""
    target = data
    for key in path[:-1]:
        target = target[key]
    if new is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = new
    return data


@pytest.mark.parametrize(
    ("make", "path", "new", "message"),
    [
        (valid_lukv, ("total_budget",), 41, "layer_budgets sum to 40 but total_budget is 41"),
        (valid_lukv, ("layer_budgets", 0), -1, "layer_budgets must hold non-negative integers"),
        (valid_lukv, ("layer_budgets",), [10, 30], "layer_budgets must be a list of 3 integers"),
        (valid_lukv, ("head_budgets", 1, 0), 0, r"head_budgets\[1\] sums to"),
        (valid_lukv, ("head_budgets", 2), [1, 2, 3], r"head_budgets\[2\] must be a list of 2 integers"),
        (valid_lukv, ("head_budgets",), None, "lukv profiles need head_budgets"),
        (valid_lukv, ("head_budgets", 0, 0), 1.5, "non-negative integers"),
        (valid_lukv, ("head_budgets", 0, 0), True, "non-negative integers"),
        (valid_lukv, ("minimum",), 100, "fewer than minimum 100"),
        (valid_lukv, ("context_budget",), 0, "context_budget must be a positive integer or null"),
        (valid_lukv, ("context_budget",), 12.5, "context_budget must be a positive integer or null"),
        (valid_lukv, ("scorer",), 3, "scorer must be a scorer's name or null"),
        (valid_lukv, ("scorer",), "", "scorer must be a scorer's name or null"),
        (valid_lukv, ("num_kv_heads",), 0, "num_kv_heads must be a positive integer"),
        (valid_lukv, ("num_layers",), 4, "layer_budgets must be a list of 4 integers"),
        (valid_lukv, ("curves", 1), [[0.0, 1.0]], r"curves\[1\] must hold 2 curves"),
        (valid_lukv, ("curves", 0, 1), [0.0, 1.0], r"curves\[0\]\[1\] covers budgets 0..1, but head_budgets"),
        (valid_lukv, ("curves", 0, 1), [], r"curves\[0\]\[1\] must be a non-empty list of finite numbers"),
        (valid_lukv, ("curves", 2, 0, 0), float("nan"), r"curves\[2\]\[0\] must be a non-empty list of finite"),
        (valid_lukv, ("curves",), [], "curves must have 3 entries"),
        (valid_lukv, ("method",), "h2o", "method must be one of"),
        (valid_lukv, ("model",), 7, "model must be a string"),
        (valid_lukv, ("metadata",), [], "metadata must be a dict"),
        (valid_lukv, ("format_version",), 3, "unsupported format_version 3"),
        (valid_lukv, ("format_version",), ..., "unsupported format_version None"),
        (valid_lukv, ("extra",), 1, r"unknown keys \['extra'\]"),
        (valid_lukv, ("layer_budgets",), ..., r"missing keys \['layer_budgets'\]"),
        (valid_reasonalloc, ("layer_budgets",), [7, 9, 32], r"layers \[0, 1\] do not split evenly over 2 KV heads"),
        (valid_reasonalloc, ("curves",), [0.3, 0.7, 0.5], r"curves\[0\] must be a non-empty list of finite numbers"),
        (valid_reasonalloc, ("curves", 1), [0.0, 1.0], r"curves\[1\] covers budgets 0..1, but its heads"),
        (valid_reasonalloc, ("curves",), [[0.0]], "curves must have 3 entries"),
        (valid_reasonalloc, ("format_version",), 1, "format 1 ReasonAlloc profiles store a need per layer"),
    ],
)
def test_inconsistent_files_are_rejected(make, path, new, message, tmp_path):
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(edit(make(), path, new)))
    with pytest.raises(ValueError, match=message) as error:
        BudgetProfile.load(file)
    assert str(file) in str(error.value)


def test_format_1_lukv_files_still_load(tmp_path):
    file = tmp_path / "lukv-format1.json"
    file.write_text(json.dumps(edit(valid_lukv(), ("format_version",), 1)))
    assert BudgetProfile.load(file) == lukv_profile()


def test_files_that_record_no_scorer_load_with_none(tmp_path):
    """Profiles written before the scorer was recorded: the policy then falls back to LongFlow."""
    file = tmp_path / "lukv-unrecorded.json"
    file.write_text(json.dumps(edit(valid_lukv(), ("scorer",), ...)))
    assert BudgetProfile.load(file).scorer is None
    assert lukv_profile().scorer == "rkv" and lukv_profile().rescale(60).scorer == "rkv", "re-solving keeps it"


def test_broken_json_names_the_file(tmp_path):
    file = tmp_path / "broken.json"
    file.write_text("{")
    with pytest.raises(ValueError, match=r"invalid budget profile .*broken\.json"):
        BudgetProfile.load(file)
    file.write_text("[]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        BudgetProfile.load(file)


def test_construction_validates_too():
    with pytest.raises(ValueError, match="layer_budgets sum to 3 but total_budget is 4"):
        BudgetProfile("reasonalloc", "m", num_layers=1, num_kv_heads=1, total_budget=4, layer_budgets=[3])


@pytest.mark.parametrize("total", [6, 7, 17, 40, 75, 101])
def test_lukv_rescale_keeps_sums_exact(total):
    profile = lukv_profile(minimum=1)
    rescaled = profile.rescale(total)
    assert rescaled.total_budget == total == sum(rescaled.layer_budgets) == sum(map(sum, rescaled.head_budgets))
    assert min(map(min, rescaled.head_budgets)) >= 1
    assert rescaled.curves == profile.curves and rescaled.metadata == profile.metadata
    assert profile.rescale(profile.total_budget) == profile


@pytest.mark.parametrize("method", ["lukv", "reasonalloc"])
def test_rescale_with_a_floor(method):
    profile = lukv_profile(minimum=1) if method == "lukv" else reasonalloc_profile()
    total = 8 * profile.num_layers * HEADS
    unfloored = profile.rescale(total).head_budget_table()
    floored = profile.rescale(total, minimum=7)
    assert floored.minimum == 7 and sum(map(sum, floored.head_budget_table())) == total
    assert min(map(min, floored.head_budget_table())) >= 7 > min(map(min, unfloored))


@pytest.mark.parametrize("total", [12, 14, 30, 48, 1000])
def test_reasonalloc_rescale_keeps_sums_exact(total):
    rescaled = reasonalloc_profile().rescale(total)
    assert rescaled.total_budget == total == sum(rescaled.layer_budgets)
    assert all(budget % HEADS == 0 and budget // HEADS >= 2 for budget in rescaled.layer_budgets)


@pytest.mark.parametrize("method", ["lukv", "reasonalloc"])
def test_a_total_past_the_curves_fills_them_and_spreads_the_rest_evenly(method):
    """Budgets longer than the calibration sequences: every head keeps what its curve spans, plus
    an even share of the rest (the curves are flat there: calibration has nothing more to keep)."""
    profile = lukv_profile() if method == "lukv" else reasonalloc_profile()
    heads = [len(curve) - 1 for layer in profile.curves for curve in (layer if method == "lukv" else [layer])]
    most = sum(heads) * (1 if method == "lukv" else HEADS)
    extra_per_head = 5
    table = profile.rescale(most + extra_per_head * profile.num_layers * HEADS).head_budget_table()
    whole = [[span] * HEADS for span in heads] if method == "reasonalloc" else [heads[i : i + HEADS]
             for i in range(0, len(heads), HEADS)]  # fmt: skip
    assert table == [[budget + extra_per_head for budget in row] for row in whole]


def test_rescale_errors():
    with pytest.raises(ValueError, match="below the sum of the minimum"):
        lukv_profile(minimum=1).rescale(5)
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        reasonalloc_profile().rescale(49)
    bare = BudgetProfile("reasonalloc", "m", num_layers=1, num_kv_heads=2, total_budget=4, layer_budgets=[4])
    with pytest.raises(ValueError, match="stores no curves"):
        bare.rescale(8)
