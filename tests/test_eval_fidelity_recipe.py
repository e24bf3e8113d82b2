"""The fidelity recipe's bookkeeping (recipes/eval_fidelity.py) without a model: loop-free and
in-loop summaries, perplexity by position, first divergence, merging runs; and the profiler's
choice of calibration answers (recipes/profile_budgets.py)."""

import argparse
import json
import math

import pytest
import torch

from recipe_loader import load_recipe

eval_fidelity = load_recipe("eval_fidelity.py")
profile_budgets = load_recipe("profile_budgets.py")


def answer(kind: str, length: int, loop_start: int | None) -> "eval_fidelity.Answer":
    return eval_fidelity.Answer("math", 0, kind, [1, 2], list(range(length)), loop_start, length)


def test_summaries_keep_loop_free_positions_apart_from_loops():
    answers = [answer("greedy", 4, 2), answer("sampled", 3, None)]
    metrics = {0: {"kl": torch.tensor([1.0, 3.0, 0.0, 0.0]), "agree": torch.tensor([0.0, 1.0, 1.0, 1.0])},
               1: {"kl": torch.tensor([2.0, 2.0, 5.0]), "agree": torch.tensor([1.0, 0.0, 1.0])}}  # fmt: skip
    summary = eval_fidelity.summarize_traces(answers, metrics)
    groups = summary["groups"]
    assert groups["greedy loop-free"] == {"kl": 2.0, "agreement": 0.5, "positions": 2}
    assert groups["greedy in loops"] == {"kl": 0.0, "agreement": 1.0, "positions": 2}
    assert groups["sampled in loops"] == {"kl": None, "agreement": None, "positions": 0}
    assert groups["all loop-free"]["positions"] == 5 and summary["kl"] == pytest.approx(13 / 5)
    assert summary["agreement"] == pytest.approx(3 / 5)
    assert summary["per_answer"] == [{"kl_loop_free": 2.0, "agreement_loop_free": 0.5},
                                     {"kl_loop_free": 3.0, "agreement_loop_free": pytest.approx(2 / 3)}]  # fmt: skip


def test_perplexity_overall_and_by_window():
    nll = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 4.0]])
    overall, windows = eval_fidelity.perplexity(nll, 2)
    assert overall == pytest.approx(math.exp(1.0)) and windows == [1.0, pytest.approx(math.exp(3.0))]


@pytest.mark.parametrize(("tokens", "reference", "expected"),
                         [([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 5, 3], 1), ([7], [1], 0)])  # fmt: skip
def test_first_divergence(tokens, reference, expected):
    assert eval_fidelity.first_divergence(tokens, reference) == expected


def test_merge_combines_runs_split_by_part_and_refuses_other_settings(tmp_path):
    settings = {"ppl_window": 16, "ppl_tokens": 32}
    full = {"part": "ppl", "policy": "full", "budget_label": "full", "budget": None, "ppl": 2.0,
            "ppl_by_position": [2.0, 2.0]}  # fmt: skip
    tight = {**full, "policy": "longflow", "budget_label": "10%", "budget": 3, "ppl": 9.0}
    loose = {**full, "policy": "longflow", "budget_label": "128", "budget": 128, "ppl": 2.5}
    first = {"settings": settings, "commands": ["a"], "budgets": {"ppl": {"10%": 3}}, "mean_answer_tokens": 10.0,
             "rows": [full, tight]}  # fmt: skip
    second = {"settings": settings, "commands": ["b"], "budgets": {"ppl": {"128": 128}}, "rows": [full, loose]}
    paths = [tmp_path / "first.json", tmp_path / "second.json"]
    for path, results in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(results))
    out = tmp_path / "merged.json"
    eval_fidelity.merge(paths, out)
    merged = json.loads(out.read_text())
    assert [(r["policy"], r["budget_label"]) for r in merged["rows"]] == [("full", "full"), ("longflow", "10%"),
                                                                        ("longflow", "128")]  # fmt: skip
    assert merged["budgets"] == {"ppl": {"10%": 3, "128": 128}} and merged["commands"] == ["a", "b"]
    assert merged["mean_answer_tokens"] == 10.0 and out.with_suffix(".png").is_file()
    paths[1].write_text(json.dumps({**second, "settings": {**settings, "ppl_tokens": 64}}))
    with pytest.raises(SystemExit, match="other settings"):
        eval_fidelity.merge(paths, out)


def test_calibration_takes_the_longest_loop_free_prefixes(tmp_path):
    loop = [7, 8, 9] * 20  # a loop from its second period on
    answers = [{"prompt_ids": [1], "answer_ids": list(range(10, 50))},  # 40 tokens, no loop
               {"prompt_ids": [2], "answer_ids": [5, 6, *loop]},  # loop-free prefix of 5 tokens
               {"prompt_ids": [3], "answer_ids": list(range(100, 130))}]  # fmt: skip
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({"answers": answers}))
    args = argparse.Namespace(answers=path, problems=2, answer_tokens=35, loop_span=4)
    prompts, traces = profile_budgets.calibration_ids(args, tokenizer=None)
    assert prompts == [[1], [3]] and traces == [list(range(10, 45)), list(range(100, 130))]
    args.problems = 3
    assert profile_budgets.calibration_ids(args, tokenizer=None)[1][2] == [5, 6, 7, 8, 9]
