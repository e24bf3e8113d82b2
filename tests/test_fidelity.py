"""The KL fidelity metric (longflow_patch.fidelity) and the budget profiler built on it
(recipes/profile_budgets.py), on the bundled toy reasoner on the CPU."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import longflow_patch
from longflow_patch import toy
from longflow_patch.fidelity import mean_kl, trace_log_probs

from recipe_loader import load_recipe

profile_budgets = load_recipe("profile_budgets.py")


@pytest.fixture(scope="module")
def toy_traces():
    model = AutoModelForCausalLM.from_pretrained(toy.model_path(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy.model_path(), padding_side="left")
    problems = toy.make_problems(2, "fidelity test", blocks=1, with_solution=True)
    prompts = [p["prompt"] for p in problems]
    traces = [p["solution"][: 120 + 40 * i] for i, p in enumerate(problems)]  # unequal lengths: padding
    with torch.no_grad():
        reference = trace_log_probs(model, tokenizer, prompts, traces)
    return model, tokenizer, prompts, traces, reference


def test_a_cache_that_keeps_everything_has_no_kl(toy_traces):
    """Every trace position, the first included (predicted by the prompt's last logits), matches."""
    model, tokenizer, prompts, traces, (full, mask) = toy_traces
    longflow_patch.apply(model, policy="full")
    try:
        with torch.no_grad():
            cached, cached_mask = trace_log_probs(
                model, tokenizer, prompts, traces, lambda: longflow_patch.new_cache(model)
            )
    finally:
        longflow_patch.unapply(model)
    assert torch.equal(mask, cached_mask) and mask.sum() == sum(len(t) for t in traces)
    with torch.no_grad():
        alone, _ = trace_log_probs(model, tokenizer, prompts[:1], traces[:1])  # the padded row, unpadded
    torch.testing.assert_close(full[0, : len(traces[0])], alone[0], atol=2e-4, rtol=0)
    torch.testing.assert_close(cached[mask], full[mask], atol=2e-4, rtol=0)
    assert mean_kl(full, cached, mask) < 1e-6


def test_one_head_held_to_a_small_budget_costs_kl_and_a_whole_one_does_not(toy_traces):
    model, tokenizer, prompts, traces, reference = toy_traces
    whole = 300
    kl = [profile_budgets.head_kl(model, tokenizer, prompts, traces, reference,
                                  profile_budgets.isolated_head_table(6, 2, 4, 1, budget, whole), "rkv", 8)
          for budget in (whole, 32)]  # fmt: skip
    assert abs(kl[0]) < 1e-6
    assert kl[1] > 1e-3, "the table look-up layer loses look-ups at 32 slots"


def test_isolated_head_table_holds_one_head_to_its_budget():
    table = profile_budgets.isolated_head_table(3, 2, 1, 0, 40, 100)
    assert table[1][0] == 40
    others = [limit for layer, row in enumerate(table) for head, limit in enumerate(row) if (layer, head) != (1, 0)]
    assert len(set(others)) == 1 and 100 <= others[0] < 106
    assert sum(map(sum, table)) % 6 == 0


def test_utility_curves_and_needs_from_measured_kl():
    kl = np.array([[[0.5, 0.1, 0.0]], [[0.04, 0.03, 0.01]]])  # [L=2, H=1, grid of 3]
    grid = [10, 20, 40]
    curves = profile_budgets.utility_curves(kl, grid, 51)
    head = curves[0][0]
    assert len(head) == 51
    assert head[0] == head[10] == -0.5 and head[15] == pytest.approx(-0.3) and head[20] == -0.1
    assert head[40] == 0.0 and head[50] == 0.0
    assert curves[1][0][45] == pytest.approx(-0.01 * 5 / 10)
    assert profile_budgets.head_needs(kl, grid, 0.02, 51) == [[40], [40]]
    assert profile_budgets.head_needs(kl, grid, 0.1, 51) == [[20], [10]]
    assert profile_budgets.head_needs(kl, grid, 0.001, 51) == [[40], [51]]
