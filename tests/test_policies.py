"""Every policy runs through `apply` on the same cache and op, and does what its rule says."""

import pytest
import torch

import longflow_patch
from longflow_patch.compat import cache_keyword

from models import left_padded_prompts, tiny_model

COMPACTING = ["snapkv", "rkv", "random"]
PROFILED = ["lukv", "reasonalloc"]  # need a budget profile: tests/test_allocated_policies.py


def generate(model, ids, mask, new_tokens, cache=None):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, **{cache_keyword(model): cache})  # fmt: skip


@pytest.mark.parametrize("policy", sorted(set(longflow_patch.POLICIES) - set(PROFILED)))
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_every_policy_stays_within_budget_with_unique_tokens(policy, per_head):
    model = tiny_model("qwen3", "gqa")
    budget = 48
    longflow_patch.apply(model, policy=policy, budget=budget, per_head=per_head, buffer=16) if policy in COMPACTING \
        else longflow_patch.apply(model, policy=policy, budget=budget, per_head=per_head)  # fmt: skip
    ids, mask = left_padded_prompts(batch=2, length=30)
    cache = longflow_patch.new_cache(model)
    out = generate(model, ids, mask, 120, cache)
    assert out.shape == (2, 150)
    for layer in cache.layers:
        assert layer.keys.shape[2] == budget
        for head in range(layer.slot_pos.shape[1]):
            held = [p for p in layer.slot_pos[1, head].tolist() if p >= 0]
            assert len(held) == len(set(held)), "a token is held twice"
            assert max(held) == 29 + 119 - 1, "the newest token is always held"  # row 1: 29 real prompt tokens


def test_full_policy_sizes_cache_per_call_and_matches_transformers():
    model = tiny_model("llama", "gqa")
    ids, mask = left_padded_prompts(batch=3, length=11)
    expected = generate(model, ids, mask, 40)
    longflow_patch.apply(model, policy="full", budget=16)  # budget is replaced by prompt + new tokens
    assert torch.equal(generate(model, ids, mask, 40), expected)


def test_streamingllm_keeps_sinks_and_the_newest_tokens():
    model = tiny_model("qwen3", "gqa")
    longflow_patch.apply(model, policy="streamingllm", budget=24, sink_tokens=4, recent_window=4)
    ids = torch.randint(3, 128, (1, 10))
    cache = longflow_patch.new_cache(model)
    generate(model, ids, torch.ones_like(ids), 60, cache)
    newest = 10 + 60 - 2  # the last generated token is not fed back
    for layer in cache.layers:
        assert sorted(layer.slot_pos[0, 0].tolist()) == [0, 1, 2, 3, *range(newest - 19, newest + 1)]


def test_h2o_accumulates_attention_and_evicts_the_lightest():
    model = tiny_model("qwen3", "gqa", layers=1)
    longflow_patch.apply(model, policy="h2o", budget=24, sink_tokens=0, recent_window=1)
    ids = torch.randint(3, 128, (1, 40))
    cache = longflow_patch.new_cache(model)
    generate(model, ids, torch.ones_like(ids), 10, cache)
    layer = cache.layers[0]
    scores = layer.accumulated[0, 0]
    assert torch.isfinite(scores).all() and (scores > 0).all()
    newest = layer.slot_pos[0, 0] == layer.slot_pos[0, 0].max()
    lightest = scores.masked_fill(newest, torch.inf).argmin()
    assert layer.write_slot[0, 0] == lightest


def test_h2o_splits_the_budget_evenly_between_heavy_hitters_and_recent_tokens():
    assert longflow_patch.make_policy("h2o", budget=128).recent_window == 64
    assert longflow_patch.make_policy("h2o", budget=129, recent_window=3).recent_window == 3
    model = tiny_model("qwen3", "gqa", layers=1)
    longflow_patch.apply(model, policy="h2o", budget=24, sink_tokens=0)
    ids = torch.randint(3, 128, (1, 40))
    cache = longflow_patch.new_cache(model)
    generate(model, ids, torch.ones_like(ids), 20, cache)
    newest = 40 + 20 - 2  # the last generated token is not fed back
    kept = set(cache.layers[0].slot_pos[0, 0].tolist())
    assert set(range(newest - 11, newest + 1)) <= kept


@pytest.mark.parametrize("policy", COMPACTING)
def test_compacting_policies_reselect_when_the_buffer_is_full(policy):
    model = tiny_model("qwen3", "gqa", layers=1)
    longflow_patch.apply(model, policy=policy, budget=40, buffer=8, sink_tokens=2, recent_window=4)
    ids = torch.randint(3, 128, (1, 20))
    cache = longflow_patch.new_cache(model)
    generate(model, ids, torch.ones_like(ids), 25, cache)
    layer = cache.layers[0]
    held = sorted(p for p in layer.slot_pos[0, 0].tolist() if p >= 0)
    # 20 prompt + 24 written tokens into 40 slots: the 21st write finds no free slot, so the cache
    # is re-selected down to 32 (sinks and the 4 newest, 36..39, protected), then 40..43 arrive.
    assert len(held) == 36 and layer.free_slots == 4
    assert held[:2] == [0, 1] and held[-8:] == list(range(36, 44))
    assert len(set(held)) == len(held)


def test_compacting_budget_must_hold_buffer():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"sink_tokens \+ recent_window \+ buffer \+ 1 = 77"):
        longflow_patch.apply(model, policy="snapkv", budget=70, buffer=64)


def pairwise_rkv_scores(keys, slot_pos, queries, scale, importance_weight=0.1):
    """R-KV's score written from its definition, with the full ``[S, S]`` cosine-similarity matrix."""
    valid = slot_pos >= 0
    importance = longflow_patch.policies.window_attention(keys, slot_pos, queries, scale)
    importance = importance / importance.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    similarity = unit @ unit.transpose(-1, -2)
    pair = valid[..., :, None] & valid[..., None, :] & ~torch.eye(keys.shape[2], dtype=torch.bool)
    mean_similarity = (similarity * pair).sum(-1) / pair.sum(-1).clamp_min(1)
    redundancy = torch.softmax(mean_similarity.masked_fill(~valid, -torch.inf), dim=-1).nan_to_num(0.0)
    return importance_weight * importance - (1 - importance_weight) * redundancy


@pytest.mark.parametrize("empty", [0, 5, 23], ids=["full", "some-empty", "one-valid"])
def test_rkv_scores_match_the_pairwise_definition(empty):
    torch.manual_seed(empty)
    batch, kv_heads, group, slots, dim = 3, 2, 4, 24, 16
    keys = torch.randn(batch, kv_heads, slots, dim)
    keys[:, :, :4] = keys[:, :, 4:5] + 0.01 * torch.randn(batch, kv_heads, 4, dim)  # near-duplicates
    slot_pos = torch.randperm(500)[: batch * kv_heads * slots].view(batch, kv_heads, slots).int()
    slot_pos[0, :, :empty] = -1  # row 0 has empty slots
    queries = torch.randn(batch, kv_heads * group, 6, dim)
    policy = longflow_patch.make_policy("rkv", budget=64, buffer=16)
    scores = policy.compaction_scores(keys, slot_pos, queries, dim**-0.5)
    torch.testing.assert_close(scores, pairwise_rkv_scores(keys, slot_pos, queries, dim**-0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["snapkv", "rkv"])
def test_compacting_policies_select_a_long_prompt_by_their_own_rule(policy):
    """A prompt longer than the budget less the buffer keeps the sinks, the recent window and the
    tokens the policy's re-selection rule ranks highest over the prompt, not the newest ones."""
    model = tiny_model("qwen3", "gqa", layers=1)
    longflow_patch.apply(model, policy=policy, budget=40, buffer=8, sink_tokens=2, recent_window=6)
    chosen = model._longflow_policy
    captured = {}
    original = chosen.prompt_scores

    def record(*args):
        captured["scores"] = original(*args)
        return captured["scores"]

    object.__setattr__(chosen, "prompt_scores", record)
    ids = torch.randint(3, 128, (1, 60))
    cache = longflow_patch.new_cache(model)
    model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True)
    kept = set(cache.layers[0].slot_pos[0, 0].tolist()) - {-1}
    protected = {0, 1, *range(54, 60)}
    ranked = captured["scores"][0].sum(dim=0).argsort(descending=True).tolist()
    best = [p for p in ranked if p not in protected][: 32 - len(protected)]
    assert kept == protected | set(best)
    assert kept != {0, 1, *range(34, 60)}, "the newest tokens alone were kept"
