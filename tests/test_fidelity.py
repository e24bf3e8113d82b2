"""The KL fidelity metric (longflow_patch.fidelity) and the budget profiler built on it
(recipes/profile_budgets.py), on the bundled toy reasoner on the CPU."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import longflow_patch
from longflow_patch import toy
from longflow_patch.fidelity import (
    mean_kl,
    position_metrics,
    repetition_start,
    trace_hidden_states,
    trace_log_probs,
)

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
    model, tokenizer, prompts, traces, _ = toy_traces
    prompt_ids = [tokenizer(text).input_ids for text in prompts]
    trace_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in traces]
    calibration = profile_budgets.Calibration.measure(model, prompt_ids, trace_ids, tokenizer.pad_token_id)
    whole = 300
    tables = [profile_budgets.held_table(6, 2, {(4, 1): budget}, whole) for budget in (whole, 32)]
    kl = [profile_budgets.head_kl(model, calibration, table, "rkv", 8) for table in tables]
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


def test_position_metrics_match_the_whole_distributions_computed_at_once(toy_traces):
    """Chunked over positions (7 at a time, across row boundaries), the per-position KL, top-1
    agreement and NLLs equal those of the ``[N, T, V]`` log-probabilities of `trace_log_probs`."""
    model, tokenizer, prompts, traces, (full, mask) = toy_traces
    prompt_ids = [tokenizer(text).input_ids for text in prompts]
    trace_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in traces]
    targets = torch.tensor([ids + [0] * (mask.shape[1] - len(ids)) for ids in trace_ids])
    longflow_patch.apply(model, policy="streamingllm", budget=48)
    try:
        with torch.no_grad():
            compressed, _ = trace_log_probs(model, tokenizer, prompts, traces, lambda: longflow_patch.new_cache(model))
            new_cache = lambda: longflow_patch.new_cache(model)  # noqa: E731
            hidden, hidden_mask = trace_hidden_states(model, prompt_ids, trace_ids, tokenizer.pad_token_id, new_cache)
            reference, _ = trace_hidden_states(model, prompt_ids, trace_ids, tokenizer.pad_token_id)
    finally:
        longflow_patch.unapply(model)
    assert torch.equal(hidden_mask, mask)
    with torch.no_grad():
        metrics = position_metrics(model.get_output_embeddings(), reference, hidden, targets, mask, chunk=7)
    kl = (full.exp() * (full - compressed)).sum(-1)
    assert metrics["kl"][mask].mean().item() == pytest.approx(mean_kl(full, compressed, mask), rel=1e-4)
    torch.testing.assert_close(metrics["kl"][mask], kl[mask], atol=1e-4, rtol=1e-4)
    assert torch.equal(metrics["agree"][mask], (full.argmax(-1) == compressed.argmax(-1)).float()[mask])
    expected_nll = -compressed.gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(metrics["nll"][mask], expected_nll[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(metrics["nll_reference"][mask], -full.gather(-1, targets[..., None])[..., 0][mask],
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    assert 0 < metrics["agree"][mask].mean() < 1 and metrics["kl"][mask].mean() > 1e-3, "48 slots must lose something"
    assert not metrics["kl"][~mask].any() and not metrics["nll"][~mask].any()


@pytest.mark.parametrize(
    ("ids", "span", "start"),
    [
        (list(range(50)), 4, None),  # nothing repeats
        ([1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 7], 3, 7),  # period 1: the window at 7 repeats the one at 6
        ([9, 8, *range(20), *range(20), *range(20)], 8, 22),  # a paragraph of 20 repeated from index 22
        ([1, 2, 3, 1, 2, 4, 1, 2, 3], 3, 6),  # (1, 2, 3) again at 6; the (1, 2) at 3 is shorter than the span
        ([5, 5], 3, None),  # shorter than one window
    ],
)
def test_repetition_start_finds_the_first_repeated_window(ids, span, start):
    assert repetition_start(ids, span) == start


def test_repetition_start_refuses_an_empty_window():
    with pytest.raises(ValueError, match="span"):
        repetition_start([1, 2, 3], 0)


def test_profile_budgets_refuses_a_grid_budget_its_scorer_cannot_hold(monkeypatch, capsys):
    """R-KV needs sink + window + buffer + 1 slots: a grid below that fails before any measuring."""
    monkeypatch.setattr("sys.argv", ["profile_budgets.py", "--grid", "16", "64", "--scorer", "rkv"])
    with pytest.raises(SystemExit):
        profile_budgets.main()
    assert "--grid 16 under --scorer rkv: budget=16 is too small for policy 'rkv'" in capsys.readouterr().err
