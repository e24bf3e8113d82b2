"""LU-KV and ReasonAlloc: ragged per-head budgets from a profile, on the shared cache and op."""

import numpy as np
import pytest
import torch

import longflow_patch
from longflow_patch.profiles import BudgetProfile

from models import left_padded_prompts, tiny_model


@pytest.fixture
def profiles(tmp_path):
    """A 2-layer, 2-KV-head profile of each kind: head 1 of layer 0 needs far more than the rest."""
    generator = np.random.default_rng(0)
    reach = [[8.0, 60.0], [20.0, 25.0]]
    curves = [[(1 - np.exp(-np.arange(200) / r)) * (1 + 0.01 * generator.random()) for r in layer] for layer in reach]
    paths = {}
    for method, data in (("lukv", curves), ("reasonalloc", [[1.0, 1.0], [3.0, 3.0]])):
        profile = BudgetProfile.from_curves(method, "tiny", data, total_budget=4 * 40, num_kv_heads=2, minimum=13)
        paths[method] = tmp_path / f"{method}.json"
        profile.save(paths[method])
    return paths


def run(model, new_tokens=90):
    ids, mask = left_padded_prompts(batch=2, length=30)
    cache = longflow_patch.new_cache(model)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0, past_key_values=cache)  # fmt: skip
    return cache


def assert_consistent(layer):
    slots = layer.keys.shape[2]
    for row in range(layer.slot_pos.shape[0]):
        for head in range(layer.slot_pos.shape[1]):
            limit = int(layer.slot_limit[row, head])
            positions = layer.slot_pos[row, head].tolist()
            assert all(p == -1 for p in positions[limit:]), "a token lives past its head's limit"
            held = [p for p in positions[:limit] if p >= 0]
            assert len(held) == len(set(held)) and len(held) <= limit <= slots
            assert 0 <= int(layer.write_slot[row, head]) < limit


def test_lukv_gives_each_head_its_solved_budget_at_equal_total(profiles):
    model = tiny_model("qwen3", "gqa")
    longflow_patch.apply(model, policy="lukv", budget=40, profile=profiles["lukv"])
    table = model._longflow_policy.head_table
    assert sum(map(sum, table)) == 2 * 2 * 40, "total KV memory equals uniform LongFlow at the same budget"
    assert table[0][1] > table[0][0], "the head whose utility saturates later gets more slots"
    cache = run(model)
    for index, layer in enumerate(cache.layers):
        assert layer.slot_limit[0].tolist() == table[index] and layer.keys.shape[2] == max(table[index])
        assert_consistent(layer)
        assert (layer.slot_pos >= 0).sum(-1).tolist()[0] == table[index], "each head full at its own budget"


def test_reasonalloc_layers_follow_needs_and_heads_trade_slots_online(profiles):
    model = tiny_model("qwen3", "gqa")
    longflow_patch.apply(model, policy="reasonalloc", budget=40, profile=profiles["reasonalloc"], rebalance_every=4,
                         rebalance_slots=3)  # fmt: skip
    table = model._longflow_policy.head_table
    assert sum(table[1]) > sum(table[0]), "the layer that needs more gets more"
    cache = run(model, new_tokens=120)
    moved = False
    for index, layer in enumerate(cache.layers):
        assert_consistent(layer)
        assert layer.slot_limit.sum(-1).tolist() == [sum(table[index])] * 2, "a layer's total never changes"
        moved |= layer.slot_limit[:, 0].tolist() != [table[index][0]] * 2
    assert moved, "no head traded slots"


def test_lukv_compiles_as_one_graph(profiles):
    from test_compile import compiled_generate, counting_backend

    torch._dynamo.reset()
    model = tiny_model("qwen3", "gqa")
    ids, mask = left_padded_prompts(batch=2, length=10)
    longflow_patch.apply(model, policy="lukv", budget=40, profile=profiles["lukv"])
    eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=50, min_new_tokens=50, do_sample=False,
                           pad_token_id=0)  # fmt: skip
    graphs = []
    assert torch.equal(compiled_generate(model, ids, mask, 50, counting_backend(graphs)), eager)
    assert len(graphs) == 1


def test_profiled_policies_need_a_matching_profile(profiles):
    model = tiny_model()
    with pytest.raises(ValueError, match="needs profile=PATH"):
        longflow_patch.apply(model, policy="lukv", budget=40)
    longflow_patch.apply(model, policy="lukv", budget=40, profile=profiles["reasonalloc"])
    with pytest.raises(ValueError, match="is a 'reasonalloc' profile"):
        longflow_patch.new_cache(model).layers[0].policy.head_table  # noqa: B018
