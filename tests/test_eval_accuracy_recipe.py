"""CPU smoke run of the accuracy harness (recipes/eval_accuracy.py) on the bundled toy reasoner."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_loader import load_recipe

ROOT = Path(__file__).resolve().parents[1]
# The fields of a results file that merge reads (besides its rows).
HEADER = {"benchmark": "accuracy_toy", "problems": 8, "seed": 1, "blocks": [2, 6], "mean_trace_tokens": 100.0}


def row(policy: str, label: str, accuracy: float) -> dict:
    """One row of a results file."""
    return {"policy": policy, "budget_label": label, "budget": 20, "accuracy": accuracy, "ci": [0.0, 1.0],
            "blocks_solved": accuracy, "kl": 0.1}  # fmt: skip


def test_accuracy_harness_smoke_run(tmp_path):
    out = tmp_path / "accuracy.json"
    command = [sys.executable, str(ROOT / "recipes" / "eval_accuracy.py"), "--problems", "2", "--blocks", "1", "1",
               "--policies", "streamingllm", "--budgets", "25%", "--kl-problems", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, cwd=tmp_path, timeout=900)
    result = json.loads(out.read_text())
    full, streaming = result["rows"]
    assert full["policy"] == "full" and full["kl"] == 0.0
    assert streaming["policy"] == "streamingllm" and streaming["budget"] == round(0.25 * result["mean_trace_tokens"])
    assert 0.0 <= streaming["accuracy"] <= 1.0 and streaming["ci"][0] <= streaming["accuracy"] <= streaming["ci"][1]
    assert streaming["kl"] > 0.0, "evicting three quarters of the trace must change the next-token distributions"
    assert out.with_suffix(".png").is_file()


def test_merge_keeps_the_last_measurement_of_each_configuration(tmp_path):
    eval_accuracy = load_recipe("eval_accuracy.py")

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(
        json.dumps({**HEADER, "rows": [row("full", "full", 1.0), row("rkv", "20%", 0.25), row("h2o", "20%", 0.0)]})
    )
    new.write_text(json.dumps({**HEADER, "rows": [row("full", "full", 1.0), row("rkv", "20%", 0.5)]}))
    out = tmp_path / "merged.json"
    eval_accuracy.merge([old, new], out)
    merged = json.loads(out.read_text())
    rows = {(r["policy"], r["budget_label"]): r["accuracy"] for r in merged["rows"]}
    assert rows == {("full", "full"): 1.0, ("rkv", "20%"): 0.5, ("h2o", "20%"): 0.0}
    assert merged["merged_from"] == [str(old), str(new)]

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**HEADER, "seed": 2, "rows": [row("full", "full", 1.0)]}))
    with pytest.raises(ValueError, match="other problems"):
        eval_accuracy.merge([old, other], out)


def test_merge_keeps_the_history_of_a_results_file(tmp_path):
    """Merging a new run into a committed results file keeps that file's history and note and adds
    the new run (its description when given, once for all files without history)."""
    eval_accuracy = load_recipe("eval_accuracy.py")
    full = row("full", "full", 1.0)
    committed, part1, part2 = tmp_path / "committed.json", tmp_path / "part1.json", tmp_path / "part2.json"
    committed.write_text(json.dumps({**HEADER, "rows": [full], "merged_from": ["run 1", "run 2"], "note": "n."}))
    for part in (part1, part2):
        part.write_text(json.dumps({**HEADER, "rows": [full]}))
    out = tmp_path / "merged.json"
    eval_accuracy.merge([committed, part1, part2], out, "run 3")
    merged = json.loads(out.read_text())
    assert merged["merged_from"] == ["run 1", "run 2", "run 3"] and merged["note"] == "n."
    eval_accuracy.merge([out, part1], out)
    merged = json.loads(out.read_text())
    assert merged["merged_from"] == ["run 1", "run 2", "run 3", str(part1)] and merged["note"] == "n."


def test_pool_adds_up_problem_sets_and_tests_against_the_baseline(tmp_path):
    eval_accuracy = load_recipe("eval_accuracy.py")
    first, second, again = tmp_path / "seed1.json", tmp_path / "seed2.json", tmp_path / "again.json"
    first.write_text(json.dumps({**HEADER, "rows": [row("longflow", "5%", 0.0), row("lukv", "5%", 0.25),
                                                    row("rkv", "5%", 0.5)]}))  # fmt: skip
    second.write_text(json.dumps({**HEADER, "seed": 2, "rows": [row("longflow", "5%", 0.0), row("lukv", "5%", 0.125)]}))
    out = tmp_path / "pooled.json"
    eval_accuracy.pool([first, second], out, "longflow")
    pooled = {r["policy"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(pooled) == {"longflow", "lukv"}, "a configuration missing from one set is not pooled"
    lukv = pooled["lukv"]
    assert (lukv["solved_per_set"], lukv["correct"], lukv["problems"]) == ([2, 1], 3, 16)
    assert lukv["blocks_solved"] == pytest.approx(3 / 16)
    # 3 of 16 against 0 of 16: the 3 successes all fall in the first group with probability C(16,3) / C(32,3).
    assert lukv["p_above_baseline"] == pytest.approx(560 / 4960)
    assert "p_above_baseline" not in pooled["longflow"]
    assert eval_accuracy.fisher_greater(4, 10, 4, 10) > 0.5 > eval_accuracy.fisher_greater(9, 10, 1, 10)

    again.write_text(first.read_text())
    with pytest.raises(ValueError, match="same problems"):
        eval_accuracy.pool([first, again], out, "longflow")

    # Without --out the default results file would be overwritten: refused.
    command = [sys.executable, str(ROOT / "recipes" / "eval_accuracy.py"), "--pool", str(first), str(second)]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "--merge and --pool need --out" in refused.stderr


@pytest.mark.filterwarnings("ignore:policy .* uses budgets measured under")  # the "+longflow" specs, on purpose
def test_policy_specs_build_the_policy_they_name():
    eval_accuracy = load_recipe("eval_accuracy.py")
    expected = {  # spec: (class name, per_head, scorer)
        "longflow": ("longflow", False, None),
        "rkv:per_head": ("rkv", True, None),
        "lukv": ("lukv", True, "rkv"),  # the scorer the toy's profiles were measured under
        "lukv+longflow": ("lukv", True, "longflow"),
        "reasonalloc+rkv": ("reasonalloc", True, "rkv"),
        "lukv+rkv:shared": ("lukv", False, "rkv"),
        "reasonalloc:shared": ("reasonalloc", False, "rkv"),
        "reasonalloc+longflow:shared": ("reasonalloc", False, "longflow"),
        "reasonalloc+rkv:static": ("reasonalloc", True, "rkv"),
    }
    for spec, (name, per_head, scorer) in expected.items():
        assert spec in eval_accuracy.CHOICES
        policy = eval_accuracy.make_policy(spec, 256)
        assert (policy.name, policy.per_head, getattr(policy, "scorer", None)) == (name, per_head, scorer), spec
        assert getattr(policy, "online", True) == (not spec.endswith(":static")), spec
        assert policy.budget == 256 and policy.compacting == (scorer == "rkv" or name == "rkv")
        assert not policy.compacting or policy.reserve == 32, "compacting scorers get a buffer of budget // 8"


@pytest.mark.parametrize(("spec", "layer_four", "average"), [("4:whole/128", 5000, 940), ("4:256/102", 256, 128)])
def test_hand_tables_hold_one_layer_and_the_rest(spec, layer_four, average, tmp_path):
    """``LAYER:BUDGET/REST``: the layer's KV heads at BUDGET (``whole``: the given size), every other
    head within one slot of REST, at a whole average (the policy's budget)."""
    eval_accuracy = load_recipe("eval_accuracy.py")
    policy = eval_accuracy.table_policy(spec, 5000, tmp_path)
    table = policy.head_table
    assert table[4] == [layer_four, layer_four] and policy.budget == average
    rest = [limit for layer, row in enumerate(table) if layer != 4 for limit in row]
    assert max(rest) - min(rest) <= 1 and sum(map(sum, table)) == 12 * average
    assert (policy.name, policy.scorer, policy.buffer, policy.floor_share) == ("lukv", "rkv", 16, 0.0)


@pytest.mark.filterwarnings("ignore:policy .* uses budgets measured under")
def test_policy_specs_set_policy_fields_after_an_at_sign():
    eval_accuracy = load_recipe("eval_accuracy.py")
    spec = eval_accuracy.policy_spec("lukv+longflow:shared@floor_share=0.9@recent_window=16")
    policy = eval_accuracy.make_policy(spec, 256)
    assert (policy.scorer, policy.per_head, policy.floor_share, policy.recent_window) == ("longflow", False, 0.9, 16)
    for bad, message in (("lukv+nope", "unknown policy 'lukv\\+nope'"), ("rkv@buffer", "is not FIELD=VALUE"),
                         ("rkv@buffer=eight", "is not FIELD=VALUE")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            eval_accuracy.policy_spec(bad)
