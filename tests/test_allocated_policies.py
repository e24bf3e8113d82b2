"""LU-KV and ReasonAlloc: ragged per-head budgets from a profile, on the shared cache and op."""

import dataclasses
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
import torch._inductor.config

import longflow_patch
from longflow_patch.compat import cache_keyword
from longflow_patch.profiles import BudgetProfile

from models import left_padded_prompts, tiny_model


@pytest.fixture
def profiles(tmp_path):
    """A 2-layer, 2-KV-head profile of each kind: LU-KV's head 1 of layer 0 needs far more than the
    rest; ReasonAlloc's layer 1 saturates later than layer 0."""
    generator = np.random.default_rng(0)
    reach = [[8.0, 60.0], [20.0, 25.0]]
    curves = [[(1 - np.exp(-np.arange(200) / r)) * (1 + 0.01 * generator.random()) for r in layer] for layer in reach]
    layer_curves = [2 * (1 - np.exp(-np.arange(200) / r)) for r in (10.0, 60.0)]
    paths = {}
    for method, data in (("lukv", curves), ("reasonalloc", layer_curves)):
        profile = BudgetProfile.from_curves(method, "tiny", data, total_budget=4 * 40, num_kv_heads=2, minimum=13)
        paths[method] = tmp_path / f"{method}.json"
        profile.save(paths[method])
    paths["reasonalloc-31"] = tmp_path / "reasonalloc-31.json"  # layer 0 at 31 slots per head
    BudgetProfile.fixed([[31, 31], [49, 49]], "tiny", "reasonalloc").save(paths["reasonalloc-31"])
    return paths


def run(model, new_tokens=90):
    ids, mask = left_padded_prompts(batch=2, length=30)
    cache = longflow_patch.new_cache(model)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0, **{cache_keyword(model): cache})  # fmt: skip
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


def test_reasonalloc_layers_follow_their_curves_and_heads_trade_slots_online(profiles):
    model = tiny_model("qwen3", "gqa")
    longflow_patch.apply(model, policy="reasonalloc", budget=40, profile=profiles["reasonalloc"], rebalance_every=2)
    table = model._longflow_policy.head_table
    assert sum(table[1]) > sum(table[0]), "the layer whose utility saturates later gets more"
    cache = run(model, new_tokens=120)
    moved = False
    for index, layer in enumerate(cache.layers):
        assert_consistent(layer)
        assert layer.slot_limit.sum(-1).tolist() == [sum(table[index])] * 2, "a layer's total never changes"
        moved |= layer.slot_limit[:, 0].tolist() != [table[index][0]] * 2
    assert moved, "no head traded slots"


@pytest.mark.parametrize("method", ["lukv", "reasonalloc"])
def test_allocated_policies_compile_as_one_graph(profiles, method):
    """ReasonAlloc's online moves included: the compiled steps give eager's tokens, and eager's
    limits show slots moved between heads along the way."""
    from test_compile import compiled_generate, counting_backend

    torch._dynamo.reset()
    model = tiny_model("qwen3", "gqa")
    ids, mask = left_padded_prompts(batch=2, length=10)
    settings = {"rebalance_every": 1} if method == "reasonalloc" else {}
    longflow_patch.apply(model, policy=method, budget=40, profile=profiles[method], **settings)
    assert model._longflow_policy.compileable
    eager_cache = longflow_patch.new_cache(model)
    eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=50, min_new_tokens=50, do_sample=False,
                           pad_token_id=0, **{cache_keyword(model): eager_cache})  # fmt: skip
    graphs = []
    assert torch.equal(compiled_generate(model, ids, mask, 50, counting_backend(graphs)), eager)
    assert len(graphs) == 1
    if method == "reasonalloc":
        limits = torch.stack([layer.slot_limit for layer in eager_cache.layers])
        assert (limits != limits[:, :, :1]).any(), "no slot moved between heads in 50 steps"


def test_reasonalloc_compiled_by_inductor_gives_eager_tokens(profiles):
    """The real backend (inductor, on the CPU here), with ReasonAlloc's online moves (the op also
    writes ``slot_limit``): eager's tokens."""
    from test_compile import compiled_generate

    torch._dynamo.reset()
    model = tiny_model("qwen3", "gqa")
    ids, mask = left_padded_prompts(batch=2, length=10)
    longflow_patch.apply(model, policy="reasonalloc", budget=40, profile=profiles["reasonalloc"], rebalance_every=1)
    eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=50, min_new_tokens=50, do_sample=False,
                           pad_token_id=0)  # fmt: skip
    with torch._inductor.config.patch(force_disable_caches=True):
        assert torch.equal(compiled_generate(model, ids, mask, 50, "inductor"), eager)


def test_profiled_policies_need_a_matching_profile(profiles):
    model = tiny_model()
    with pytest.raises(ValueError, match="needs profile=PATH"):
        longflow_patch.apply(model, policy="lukv", budget=40)
    with pytest.raises(ValueError, match="is a 'reasonalloc' profile, not 'lukv'"):
        longflow_patch.apply(model, policy="lukv", budget=40, profile=profiles["reasonalloc"])


def test_an_allocator_runs_over_the_scorer_its_profile_was_measured_under(profiles, tmp_path):
    """Default scorer: the profile's (LongFlow when it records none); another one warns; profiles
    measured under different scorers need one named; an R-KV-measured profile cannot compile."""
    measured = {}
    for scorer in ("rkv", "longflow"):
        measured[scorer] = tmp_path / f"lukv-{scorer}.json"
        profile = BudgetProfile.load(profiles["lukv"])
        dataclasses.replace(profile, scorer=scorer, context_budget=20 if scorer == "rkv" else 80).save(measured[scorer])
    make = partial(longflow_patch.make_policy, "lukv", budget=40, buffer=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching scorers: no warning
        assert make(profile=profiles["lukv"]).scorer == "longflow", "an unrecorded scorer falls back to LongFlow"
        assert make(profile=measured["rkv"]).scorer == "rkv" and make(profile=measured["rkv"]).compacting
        assert make(profile=measured["longflow"]).scorer == "longflow"
        assert make(profile=measured["rkv"], scorer="rkv") == make(profile=measured["rkv"])
    with pytest.warns(UserWarning, match="over scorer 'longflow' uses budgets measured under 'rkv'"):
        assert not make(profile=measured["rkv"], scorer="longflow").compacting
    with pytest.raises(ValueError, match=r"measured under different scorers \['longflow', 'rkv'\]; pass scorer="):
        make(profile=[measured["rkv"], measured["longflow"]])
    with pytest.warns(UserWarning, match="measured under 'longflow'"):
        make(profile=[measured["rkv"], measured["longflow"]], scorer="rkv")
    with pytest.raises(ValueError, match="'lukv' over scorer 'rkv' \\(scorer='longflow' compiles\\)"):
        longflow_patch.apply(tiny_model(), policy="lukv", budget=40, profile=measured["rkv"], buffer=8, compile=True)


def test_several_profiles_solve_with_the_one_measured_nearest_the_budget(tmp_path):
    """Profiles of one method measured at different operating points (their ``context_budget``):
    each budget solves with the nearest in ratio; unrecorded points cannot be chosen between (refused when built)."""
    paths = []
    for context, favoured in ((32, 0), (512, 3)):
        curves = [[np.minimum(np.arange(400), 50 + 150 * (2 * layer + head == favoured)) for head in range(2)]
                  for layer in range(2)]  # fmt: skip
        paths.append(tmp_path / f"lukv-context{context}.json")
        BudgetProfile.from_curves("lukv", "tiny", curves, 160, 2, 13, context_budget=context).save(paths[-1])
    for budget, context in ((24, 32), (100, 32), (140, 512), (300, 512)):
        policy = longflow_patch.make_policy("lukv", budget=budget, profile=paths, floor_share=0.0)
        assert policy.budget_profile.context_budget == context, budget
        assert policy.head_table == BudgetProfile.load(paths[context == 512]).rescale(4 * budget).head_budgets
    assert longflow_patch.make_policy("lukv", budget=40, profile=paths[1]).budget_profile.context_budget == 512
    BudgetProfile.fixed([[40, 40], [40, 40]], "tiny").save(tmp_path / "unplaced.json")
    with pytest.raises(ValueError, match=r"cannot choose among 2 profiles: \[.*unplaced.json'\] record no"):
        longflow_patch.make_policy("lukv", budget=40, profile=[paths[0], tmp_path / "unplaced.json"])


def test_lukv_over_rkv_keeps_each_head_within_its_budget_between_re_selections(profiles):
    """Each head re-selected by R-KV keeps its own budget less the buffer, then fills the buffer."""
    model, buffer = tiny_model("qwen3", "gqa"), 8
    longflow_patch.apply(model, policy="lukv", budget=40, profile=profiles["lukv"], scorer="rkv", buffer=buffer)
    policy = model._longflow_policy
    assert policy.compacting and not policy.compileable, "R-KV re-selects on the host: compacting, eager"
    table = policy.head_table
    assert sum(map(sum, table)) == 2 * 2 * 40 and table[0][1] > table[0][0], "equal total, later head gets more"
    cache = run(model)
    for index, layer in enumerate(cache.layers):
        assert layer.slot_limit.tolist() == [table[index]] * 2, "LU-KV's budgets never move"
        assert layer.keys.shape[2] == max(table[index]) and not layer.is_compileable
        assert_consistent(layer)
        held = (layer.slot_pos >= 0).sum(-1).tolist()
        for row in held:
            for tokens, limit in zip(row, table[index], strict=True):
                assert limit - buffer <= tokens <= limit, f"layer {index}: {tokens} tokens under a limit of {limit}"


def test_profiled_policy_over_rkv_needs_room_for_the_buffer(profiles):
    """The scorer's own floor applies, and the error says which policy over which scorer."""
    minimum = 4 + 8 + 8 + 1  # sink_tokens + recent_window + buffer + 1
    longflow_patch.make_policy("lukv", budget=minimum, profile=profiles["lukv"], scorer="rkv", buffer=8)
    with pytest.raises(ValueError) as error:
        longflow_patch.make_policy("lukv", budget=minimum - 1, profile=profiles["lukv"], scorer="rkv", buffer=8)
    assert "'lukv'" in str(error.value) and "'rkv'" in str(error.value), f"names policy and scorer: {error.value}"


def test_reasonalloc_over_rkv_trades_slots_at_re_selections(profiles):
    """Re-selections move slots between the heads of a layer, within the layer's total and the minimum."""
    model = tiny_model("qwen3", "gqa")
    longflow_patch.apply(model, policy="reasonalloc", budget=40, profile=profiles["reasonalloc"], scorer="rkv",
                         buffer=8, rebalance_slots=3)  # fmt: skip
    policy = model._longflow_policy
    assert policy.compacting and not policy.compileable, "R-KV re-selects on the host: compacting, eager"
    table = policy.head_table
    cache = run(model, new_tokens=120)
    moved = False
    for index, layer in enumerate(cache.layers):
        assert_consistent(layer)
        assert layer.slot_limit.sum(-1).tolist() == [sum(table[index])] * 2, "a layer's total never changes"
        assert int(layer.slot_limit.min()) >= policy.minimum_budget, "a head fell below the minimum budget"
        moved |= layer.slot_limit[:, 0].tolist() != [table[index][0]] * 2
    assert moved, "no head traded slots"


@pytest.mark.parametrize("scorer", ["longflow", "rkv"])
def test_reasonalloc_without_its_online_step_keeps_the_pre_allocated_split(profiles, scorer):
    """online=False (the ablation): each head keeps its layer's pre-allocated share for the whole
    generation, in exactly that many physical slots (no slack for moves)."""
    model = tiny_model("qwen3", "gqa")
    settings = {"buffer": 8, "rebalance_slots": 3} if scorer == "rkv" else {"rebalance_every": 1}
    longflow_patch.apply(model, policy="reasonalloc", budget=40, profile=profiles["reasonalloc"], scorer=scorer,
                         online=False, **settings)  # fmt: skip
    policy = model._longflow_policy
    assert not policy.reallocates_heads and policy.per_head
    cache = run(model, new_tokens=120)
    for row, layer in zip(policy.head_table, cache.layers, strict=True):
        assert layer.keys.shape[2] == max(row), "no slack is allocated when budget never moves"
        assert layer.slot_limit.tolist() == [row] * 2, "a head's budget moved with the online step off"
        assert_consistent(layer)


@pytest.mark.parametrize("per_head", [True, False], ids=["per-head", "shared"])
def test_lukv_over_rkv_with_a_flat_profile_generates_as_uniform_rkv(tmp_path, per_head):
    """Equal budgets for every head: the allocation is a no-op, so tokens match uniform R-KV evicting
    the same way (per KV head, or shared by a layer's heads)."""
    curves = [[1 - np.exp(-np.arange(200) / 20.0)] * 2] * 2
    profile = BudgetProfile.from_curves("lukv", "tiny", curves, total_budget=4 * 40, num_kv_heads=2, minimum=13)
    profile.save(tmp_path / "flat.json")
    ids, mask = left_padded_prompts(batch=2, length=50)  # longer than a head keeps: the prompt is scored too
    outputs, flat = [], {"profile": tmp_path / "flat.json", "scorer": "rkv", "per_head": per_head}
    for policy, settings in (("rkv", {"per_head": per_head}), ("lukv", flat)):
        model = tiny_model("qwen3", "gqa")
        longflow_patch.apply(model, policy=policy, budget=40, buffer=8, **settings)
        outputs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=60, min_new_tokens=60,
                                      do_sample=False, pad_token_id=0))  # fmt: skip
    assert model._longflow_policy.head_table == [[40, 40], [40, 40]], "the flat profile is not flat"
    assert torch.equal(outputs[0], outputs[1]), "LU-KV over R-KV at equal budgets differs from uniform R-KV"


@pytest.mark.parametrize("scorer", ["longflow", "rkv"])
@pytest.mark.parametrize("method", ["lukv", "reasonalloc"])
def test_shared_allocation_gives_each_layer_the_mean_of_its_heads(profiles, method, scorer):
    """per_head=False: layer-wise budgets only. A layer's heads share its mean budget and hold the same
    tokens; the total stays within uniform's; no budget moves during decoding."""
    model = tiny_model("qwen3", "gqa")
    settings = {"buffer": 8} if scorer == "rkv" else {}
    longflow_patch.apply(model, policy=method, budget=40, profile=profiles[method], scorer=scorer, per_head=False,
                         **settings)  # fmt: skip
    policy = model._longflow_policy
    shares = [sum(row) // 2 for row in policy.head_table]
    assert len(set(shares)) > 1, "the profile gives the layers different budgets"
    assert sum(shares) <= 2 * 40 and not policy.reallocates_heads
    assert policy.compileable == (scorer == "longflow"), "only a compacting scorer needs eager decoding"
    cache = run(model, new_tokens=120)
    for share, layer in zip(shares, cache.layers, strict=True):
        assert layer.keys.shape[2] == share and layer.slot_limit.unique().tolist() == [share]
        assert torch.equal(layer.slot_pos[:, 0], layer.slot_pos[:, 1]), "the heads of a layer share eviction"
        assert_consistent(layer)
        held = (layer.slot_pos[:, 0] >= 0).sum(-1)
        assert (held >= share - settings.get("buffer", 0)).all(), f"a layer holds {held.tolist()} of {share}"


# A ReasonAlloc + R-KV layer 0 (2 KV heads of 31 live slots, 47 physical) filled by hand: every query
# of the observation window is QUERY_SIZE * e0, so a key ln(w) / (QUERY_SIZE * SCALE) * e0 draws
# attention in proportion to w. Positions 0-3 (sinks) and 23-30 (recent) are protected; of the 19
# others, the 11 best are kept (31 - buffer 8) and moves take the 3 around that cut.
HEAD_DIM, QUERY_SIZE = 4, 4.0
SCALE = HEAD_DIM**-0.5
PROTECTED = [*range(4), *range(23, 31)]


def keys_drawing(weights):
    """Keys ``[T, HEAD_DIM]`` whose attention from the observed queries is proportional to ``weights``."""
    keys = torch.zeros(len(weights), HEAD_DIM)
    keys[:, 0] = torch.tensor(weights, dtype=torch.float64).log().float() / (QUERY_SIZE * SCALE)
    return keys


def graded(protected, kept, dropped):
    """Weights of 31 tokens: ``protected`` on sinks and recent ones, ``kept`` on the best 11 others
    (positions 4-14), ``dropped`` on the rest; all above 1 (parallel keys: R-KV ranks by attention)."""
    return [protected if p in PROTECTED else kept if p < 15 else dropped for p in range(31)]


HEADS = {
    "concentrated": [math.exp(8)] + [math.exp(-8)] * 30,  # the sink takes all attention
    "uniform": [2.0] * 31,  # identical keys
    # every token of `rich` draws attention, but `lean`'s last kept tokens draw more than `rich`'s first dropped
    "rich": graded(100.0, 8.0, 4.0),
    "lean": graded(100.0, 6.0, 2.0),
}


def selection_layer(profiles, heads, **settings):
    """Layer 0 of a ReasonAlloc + R-KV cache just before a re-selection: its 2 KV heads full (31 tokens,
    positions 0-30) with the keys of ``HEADS[heads[0]]`` and ``HEADS[heads[1]]``; the prompt fills all
    but the buffer, decode steps the rest."""
    settings = dict(budget=40, profile=profiles["reasonalloc-31"], scorer="rkv", buffer=8, rebalance_slots=3) | settings
    policy = longflow_patch.make_policy("reasonalloc", **settings)
    layer = longflow_patch.LongFlowLayer(policy, layer=0)
    assert policy.head_table[0] == [31, 31] and policy.minimum_budget == 21
    keys = torch.stack([keys_drawing(HEADS[name]) for name in heads])[None]
    values = torch.randn(keys.shape, generator=torch.Generator().manual_seed(0))
    query = torch.zeros(1, 4, 31, HEAD_DIM)
    positions = torch.arange(31)[None]
    prompt = 31 - policy.buffer
    layer.prefill(query[:, :, :prompt], keys[:, :, :prompt], values[:, :, :prompt],
                  torch.ones(1, prompt, dtype=torch.bool), positions[:, :prompt], SCALE)  # fmt: skip
    layer.decode(query[:, :, prompt:], keys[:, :, prompt:], values[:, :, prompt:], positions[:, prompt:], SCALE)
    assert layer.slot_pos[0, :, :31].tolist() == [list(range(31))] * 2 and layer.free_slots == 0, "heads not full"
    assert torch.equal(layer.keys[:, :, :31], keys), "the crafted keys are not the cached ones"
    return layer


@pytest.mark.parametrize(
    "heads, settings, limits",
    [
        (("concentrated", "uniform"), {}, [28, 34]),
        (("uniform", "concentrated"), {}, [34, 28]),
        (("uniform", "uniform"), {}, [31, 31]),
        (("lean", "rich"), {}, [31, 31]),
        (("rich", "lean"), {}, [31, 31]),
        (("concentrated", "uniform"), {"rebalance_slots": 11}, [31, 31]),
        (("concentrated", "uniform"), {"capacity": 1.0}, [31, 31]),
    ],
    ids=["to-head-1", "to-head-0", "identical", "net-loss", "net-loss-mirrored", "donor-at-floor", "no-spare-slots"],
)
def test_reasonalloc_moves_slots_at_a_selection_only_where_attention_gains(profiles, heads, settings, limits):
    """Slots go from the head whose marginal kept tokens draw ~no attention to the one whose first
    dropped tokens draw real attention; not when that loses attention, leaves a head under the
    minimum budget (31 - 11 < 21) or over its physical slots (capacity 1: 31)."""
    layer = selection_layer(profiles, heads, **settings)
    observed = torch.zeros(1, 4, 2, HEAD_DIM)
    observed[..., 0] = QUERY_SIZE
    score = layer.policy.compaction_scores(layer.keys, layer.slot_pos, observed, SCALE)
    layer._reallocate_at_selection(score, observed, torch.tensor([30]), SCALE)
    assert layer.slot_limit.tolist() == [limits], f"heads {heads}: limits {layer.slot_limit.tolist()}, not {limits}"


def test_lukv_floor_keeps_every_head_at_a_share_of_the_average(profiles):
    def table(**settings):
        return longflow_patch.make_policy("lukv", budget=40, profile=profiles["lukv"], **settings).head_table

    unfloored, floored = table(floor_share=0.0), table(floor_share=0.75)
    assert min(map(min, unfloored)) < 30, "without a floor the short-reach head gets little"
    assert min(map(min, floored)) >= 30 and min(map(min, table())) >= 20, "a head keeps floor_share x the average"
    assert sum(map(sum, floored)) == sum(map(sum, unfloored)) == 2 * 2 * 40
    assert floored[0][1] == max(map(max, floored)), "the long-reach head still gets the most"
    with pytest.raises(ValueError, match="floor_share"):
        table(floor_share=1.5)


@pytest.mark.parametrize("settings", [{"rebalance_every": 0}, {"rebalance_slots": -1}])
def test_reasonalloc_refuses_a_cadence_below_one_and_negative_moves(profiles, settings):
    with pytest.raises(ValueError, match="rebalance_every must be >= 1 and rebalance_slots >= 0"):
        longflow_patch.make_policy("reasonalloc", budget=40, profile=profiles["reasonalloc"], **settings)
