"""``bench/ragged_decode.py``: its synthetic LU-KV profile reaches the cache as the drawn ragged table."""

import sys
from pathlib import Path

import pytest
import torch

import longflow_patch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ragged_decode

from longflow_patch.compat import cache_keyword


@pytest.mark.parametrize("budget", [64, 200])
def test_synthetic_profile_solves_to_the_drawn_ragged_table(tmp_path, budget):
    layers, kv_heads = 3, 4
    profile = tmp_path / "lukv.json"
    table = ragged_decode.synthetic_lukv_profile(profile, layers, kv_heads, budget, seed=1)

    assert len(table) == layers and all(sum(row) == kv_heads * budget for row in table)
    assert all(budget // 4 <= limit <= 1.5 * budget for row in table for limit in row)
    assert any(len(set(row)) > 1 for row in table)  # ragged, not uniform

    policy = longflow_patch.make_policy("lukv", budget=budget, profile=str(profile), floor_share=0.0)
    assert policy.head_table == table
    assert [policy.layer_slots(layer) for layer in range(layers)] == [max(row) for row in table]


def test_decode_step_runs_on_the_synthetic_allocation(tmp_path):
    model = ragged_decode.build_model("tiny", "cpu")
    profile = tmp_path / "lukv.json"
    table = ragged_decode.synthetic_lukv_profile(profile, 2, 2, 64, seed=0)
    longflow_patch.apply(model, policy="lukv", budget=64, profile=str(profile), floor_share=0.0)
    cache = longflow_patch.new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 512, (2, ragged_decode.PROMPT)), **{cache_keyword(model): cache})
    for layer, row in zip(cache.layers, table, strict=True):
        assert layer.slot_limit.tolist() == [row, row]
        assert layer.keys.shape[2] == max(row)


def test_moved_reasonalloc_layout_keeps_each_layers_total(tmp_path):
    model = ragged_decode.build_model("tiny", "cpu")
    profile = tmp_path / "reasonalloc.json"
    ragged_decode.flat_reasonalloc_profile(profile, 2, 2, 64)
    longflow_patch.apply(model, policy="reasonalloc", budget=64, per_head=True, profile=str(profile))
    cache = longflow_patch.new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 512, (3, ragged_decode.PROMPT)), **{cache_keyword(model): cache})
    assert all(layer.slot_limit.tolist() == [[64, 64]] * 3 for layer in cache.layers)
    ragged_decode.move_budgets(cache, 64, seed=0)
    for layer in cache.layers:
        assert layer.keys.shape[2] == 96  # 1.5x the share: ReasonAlloc's physical allocation
        assert layer.slot_limit.sum(dim=1).tolist() == [128] * 3
        assert 16 <= layer.slot_limit.min() and layer.slot_limit.max() <= 96
        assert len(set(layer.slot_limit.flatten().tolist())) > 1
