"""``bench/attention_concentration.py``: exact attention, and the bound against a brute force over
eager attention's own probabilities."""

import sys
from pathlib import Path

import pytest
import torch

from models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import attention_concentration as concentration

LENGTH, MIN_HISTORY, BUDGETS = 300, 100, [1, 8, 64, 1000]


def brute_force(attentions: tuple[torch.Tensor, ...], kv_heads: int) -> dict[tuple[int, int, int], float]:
    """Mean over queries at positions >= MIN_HISTORY of the best-k share of each KV head's group."""
    shares = {}
    for layer, weights in enumerate(attentions):
        groups = weights[0].view(kv_heads, -1, LENGTH, LENGTH).mean(1)  # [Hkv, T, T]
        for head in range(kv_heads):
            ranked = groups[head, MIN_HISTORY:].sort(-1, descending=True).values.cumsum(-1)
            for k in BUDGETS:
                shares[layer, head, k] = float(ranked[:, min(k, LENGTH) - 1].mean())
    return shares


@pytest.mark.parametrize(("arch", "heads"), [("qwen3", "gqa"), ("llama", "mqa"), ("qwen2", "mha")])
def test_best_k_shares_match_a_brute_force_and_logits_are_exact(arch, heads, monkeypatch):
    monkeypatch.setattr(concentration, "QUERY_CHUNK", 64)  # several chunks, the first below min_history
    recording = tiny_model(arch, heads, attn_implementation=concentration.ATTENTION, seed=3)
    eager = tiny_model(arch, heads, attn_implementation="eager", seed=3)
    ids = torch.randint(3, 128, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    rows = concentration.measure(recording, [ids[0].tolist()], BUDGETS, MIN_HISTORY)
    with torch.no_grad():
        reference = eager(input_ids=ids, output_attentions=True)
        torch.testing.assert_close(recording(input_ids=ids).logits, reference.logits, rtol=1e-5, atol=1e-5)

    kv_heads = recording.config.num_key_value_heads
    expected = brute_force(reference.attentions, kv_heads)
    assert len(rows) == recording.config.num_hidden_layers * kv_heads
    for row in rows:
        assert row["queries"] == LENGTH - MIN_HISTORY
        shares = [row[f"mean@{k}"] for k in BUDGETS]
        assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0)  # every key fits in 1000 slots
        for k in BUDGETS:
            assert row[f"mean@{k}"] == pytest.approx(expected[row["layer"], row["kv_head"], k], abs=1e-5)
            assert 0.0 <= row[f"p5@{k}"] <= 1.0 + 1e-6
