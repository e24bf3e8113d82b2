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
                                  profile_budgets.held_table(6, 2, {(4, 1): budget}, whole), "rkv", 8)
          for budget in (whole, 32)]  # fmt: skip
    assert abs(kl[0]) < 1e-6
    assert kl[1] > 1e-3, "the table look-up layer loses look-ups at 32 slots"


@pytest.mark.parametrize("budget", [32, 40, 48, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("others", [100, 128, 4137])
@pytest.mark.parametrize("held", [[(1, 0)], [(2, 0), (2, 1)]])
def test_held_table_is_the_allocation_a_policy_runs(held, budget, others, tmp_path):
    """The held heads at their budget, every other within one slot of the fewest extra slots, and a
    total a policy's whole ``budget`` gives: the profile `head_kl` writes solves back to exactly it."""
    table = profile_budgets.held_table(3, 2, dict.fromkeys(held, budget), others)
    assert all(table[layer][head] == budget for layer, head in held)
    rest = [limit for layer, row in enumerate(table) for head, limit in enumerate(row) if (layer, head) not in held]
    total = sum(map(sum, table))
    assert total % 6 == 0
    assert max(rest) - min(rest) <= 1 and others <= min(rest) and sum(rest) - others * len(rest) < 6
    policy = profile_budgets.fixed_table_policy(table, "rkv", 8, tmp_path / "lukv.json")
    assert policy.budget == total // 6 and policy.head_table == table


def test_utility_curves_and_layer_curves_from_measured_kl():
    kl = np.array([[[0.5, 0.1, 0.0]], [[0.04, 0.03, 0.01]]])  # [L=2, H=1, grid of 3]
    grid = [10, 20, 40]
    curves = profile_budgets.utility_curves(kl, grid, 51, isolated=True)
    head = curves[0][0]
    assert len(head) == 51
    assert head[0] == head[10] == -0.5 and head[15] == pytest.approx(-0.3) and head[20] == -0.1
    assert head[40] == 0.0 and head[50] == 0.0
    assert curves[1][0][45] == pytest.approx(-0.01 * 5 / 10)  # isolated: nothing is evicted at 50
    in_context = profile_budgets.utility_curves(kl, grid, 51, isolated=False)
    assert in_context[0][0] == head
    assert in_context[1][0][40] == in_context[1][0][50] == -0.01  # the others still evict: flat
    two_heads = [[[-0.5, -0.1, 0.0], [-0.2, -0.2, -0.1]], [[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
    assert profile_budgets.layer_curves(two_heads) == [[-0.7, -0.3, -0.1], [-1.0, 0.0, 0.0]]
