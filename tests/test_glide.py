"""The GLIDE draft and draft trees: decoding over their caches equals the training forward, greedy
output identical to ``generate`` (chains and trees, eager and compiled), speculative sampling keeps
the target's distribution, files round-trip, clear errors."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import longflow_patch
from longflow_patch.draft_tree import DraftTree, accepted_path, expand
from longflow_patch.glide import (
    GlideConfig,
    GlideDraft,
    cross_attention_mask,
    load_glide_draft,
    save_glide_draft,
    self_attention_mask,
    target_key_values,
    teacher_forced_logits,
)
from longflow_patch.glide_cache import GlideCache
from longflow_patch.glide_round import GlideRound
from longflow_patch.sampling import Sampler
from longflow_patch.speculative_cache import SpeculativeCache

from models import ARCHITECTURES, tiny_model
from recipe_loader import load_recipe
from test_speculative import exact_marginals, greedy, prompt, small_vocab_model

train_recipe = load_recipe("train_glide_draft.py")


def glide_for(model, seed: int = 1, from_target: bool = True, **overrides) -> GlideDraft:
    """A GLIDE draft for ``model``; a copy of its last layer agrees with it often enough that rounds
    keep some drafts and reject others."""
    torch.manual_seed(seed)
    draft = GlideDraft(GlideConfig.from_target(model.config, **overrides))
    return (draft.init_from_target(model) if from_target else draft).eval()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_decoding_logits_equal_the_training_forward(arch):
    """The round's draft steps (cache writes, sink-and-window visibility, tree buffer, the
    cross-attention through the verify op over the target's cache) give the training forward's
    logits at the same positions, with the lag each step has: 1 for the root, d + 1 at depth d."""
    model = longflow_patch.apply(tiny_model(arch, "gqa", layers=2), budget=64)
    glide = glide_for(model, sink_tokens=3, window=6)
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(24)[None]
    keys, values, _ = target_key_values(model, ids, positions, 1)
    with torch.no_grad():
        expected = {lag: teacher_forced_logits(glide, model, ids, positions, torch.tensor([lag]), keys, values)[0]
                    for lag in (1, 2, 3, 4)}  # fmt: skip
        root = 17
        decoder = GlideRound(model, glide, Sampler(do_sample=False), DraftTree((1, 1, 1, 1)), None)
        decoder.prefill(ids[:, :root], 40)
        got = decoder.draft_logits(ids[:, root : root + 1], positions[:, root : root + 1], None, None)
        torch.testing.assert_close(got[0], expected[1][root], rtol=1e-4, atol=1e-4)
        visible = torch.zeros(1, 3, dtype=torch.bool)
        for depth in (1, 2, 3):
            visible[0, depth - 1] = True
            at = slice(root + depth, root + depth + 1)
            got = decoder.draft_logits(ids[:, at], positions[:, at], visible.clone(), depth - 1)
            torch.testing.assert_close(got[0], expected[depth + 1][root + depth], rtol=1e-4, atol=1e-4)


def test_training_masks_lag_and_window():
    """Self-attention: causal, sinks and a window; cross-attention: ``lag`` tokens behind per row."""
    own = self_attention_mask(8, 2, 3, "cpu")
    assert own[7].tolist() == [True, True, False, False, False, True, True, True]
    assert not own[2, 3] and own[2].sum() == 3
    lagged = cross_attention_mask(6, torch.tensor([1, 3]))
    assert lagged[0, 0, 4].tolist() == [True] * 4 + [False] * 2
    assert lagged[1, 0, 4].tolist() == [True, True, False, False, False, False]
    assert lagged[1, 0, 1].tolist() == [True] + [False] * 5  # nothing to see yet: key 0 only


def test_anchor_offset_positions_keep_the_sinks():
    rng = __import__("random").Random(0)
    shifted = train_recipe.anchor_offset_positions(rng, 3, 10, 4, 1000)
    assert torch.equal(shifted[:, :4], torch.arange(4).expand(3, 4))
    offsets = shifted[:, 4:] - torch.arange(4, 10)
    assert (offsets == offsets[:, :1]).all() and (offsets[:, 0] <= 990).all() and offsets[:, 0].unique().numel() == 3
    assert torch.equal(train_recipe.anchor_offset_positions(rng, 2, 10, 4, None), torch.arange(10).expand(2, 10))


def test_glide_cache_keeps_sinks_and_window_across_the_ring():
    config = GlideConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=16,
                         intermediate_size=8, sink_tokens=2, window=4)  # fmt: skip
    cache = GlideCache(config, tree_nodes=3, dtype=torch.float32, device=torch.device("cpu"))
    for position in range(20):  # many times around the ring of window + 2 slots
        value = torch.full((1, 1, 1, 4), float(position))
        cache.write(value, value, torch.tensor([position]))
        seen = cache.keys[0, 0, cache.visible(torch.tensor([position]))[0], 0].tolist()
        expected = sorted({*range(min(position + 1, 2)), *range(max(2, position - 3), position + 1)})
        assert sorted(seen) == expected
    cache.write_tree(torch.ones(1, 1, 3, 4) * torch.tensor([30.0, 31.0, 32.0])[:, None], torch.zeros(1, 1, 3, 4), 0)
    cache.commit([2, 0], 20)
    assert sorted(cache.keys[0, 0, cache.visible(torch.tensor([21]))[0], 0].tolist()) == [0, 1, 18, 19, 30, 32]


def test_tree_expansion_and_accepted_path():
    log_probs = torch.tensor([[0.0, -1.0, -5.0], [-0.5, -3.0, -0.1]]).log_softmax(-1)
    tokens, parents, paths = expand(log_probs, torch.tensor([0.0, -0.2]), 3)
    order = (torch.tensor([0.0, -0.2])[:, None] + log_probs).flatten().argsort(descending=True)[:3]
    assert tokens.tolist() == (order % 3).tolist() and parents.tolist() == (order // 3).tolist()
    assert paths.tolist() == pytest.approx((torch.tensor([0.0, -0.2])[:, None] + log_probs).flatten()[order].tolist())
    # root -> nodes 0 (token 5), 1 (token 6); node 0 -> node 2 (token 7), node 1 -> node 3 (token 7)
    tokens, parents = [5, 6, 7, 7], [-1, -1, 0, 1]
    assert accepted_path([6, 9, 7, 9, 9], tokens, parents) == [1, 3]
    assert accepted_path([5, 8, 9, 9, 9], tokens, parents) == [0]
    assert accepted_path([4, 7, 7, 9, 9], tokens, parents) == []
    with pytest.raises(ValueError, match="width"):
        DraftTree((2, 0))
    tree = DraftTree((3, 2, 2))
    assert (tree.nodes, tree.fed, tree.offsets, tree.node_depths) == (7, 5, (0, 3, 5), (1, 1, 1, 2, 2, 3, 3))


def test_speculative_cache_keep_moves_the_path_after_the_root():
    cache = SpeculativeCache(1, 16)
    rows = torch.arange(10.0)[None, None, :, None].expand(1, 1, 10, 2)
    cache.layers[0].append(rows, rows + 100)
    cache.keep(4, [2, 5])
    assert int(cache.layers[0].length) == 7
    assert cache.layers[0].keys[0, 0, :7, 0].tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert cache.layers[0].values[0, 0, 5:7, 0].tolist() == [106, 109]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("tree", [None, (2, 2, 2), (3, 1, 2, 2)], ids=["chain", "tree-222", "tree-3122"])
def test_greedy_output_identical_to_generate(arch, tree):
    """Window 8 and 2 sinks, far below prompt + output (12 + 29): the draft's cache wraps."""
    model = tiny_model(arch, "gqa")
    model.generation_config.eos_token_id = None
    ids = prompt()
    expected = greedy(model, ids, 29)
    glide = glide_for(model, sink_tokens=2, window=8)
    got, stats = longflow_patch.speculative_generate(model, ids, max_new_tokens=29, draft=glide, num_draft_tokens=3,
                                                     draft_tree=tree, return_stats=True)  # fmt: skip
    assert torch.equal(got, expected)
    assert 0 < stats.accepted < stats.drafted  # kept and rejected drafts both exercised


def test_tree_keeps_more_tokens_per_round_than_its_first_branch():
    """The top-2 tree's rounds keep at least as many tokens as the chain of its first branch, and on
    this model more: paths through second choices are accepted."""
    model = tiny_model("qwen3", "gqa")
    model.generation_config.eos_token_id = None
    glide = glide_for(model, sink_tokens=2, window=8)
    runs = {}
    for tree in ((1, 1, 1, 1), (2, 2, 2, 2)):
        runs[tree] = longflow_patch.speculative_generate(model, prompt(seed=5), max_new_tokens=60, draft=glide,
                                                         draft_tree=tree, return_stats=True)  # fmt: skip
    assert torch.equal(runs[(1, 1, 1, 1)][0], runs[(2, 2, 2, 2)][0])
    assert runs[(2, 2, 2, 2)][1].accepted_per_round > runs[(1, 1, 1, 1)][1].accepted_per_round


@pytest.mark.parametrize("tree", [None, (2, 2)], ids=["chain", "tree"])
def test_speculative_sampling_keeps_the_target_distribution(tree):
    """A chain samples its drafts (standard speculative sampling); a tree's top-k nodes are kept
    while the target's own sample is a child: both leave the target's marginals exact."""
    target = longflow_patch.apply(small_vocab_model(0), budget=32)
    glide = glide_for(target, seed=3, from_target=False)
    ids = torch.tensor([[3, 7, 1, 12, 5]])
    exact = exact_marginals(target, ids, 4)
    generator = torch.Generator().manual_seed(0)
    runs, drafted, accepted = 1500, 0, 0
    counts = torch.zeros_like(exact)
    for _ in range(runs):
        out, stats = longflow_patch.speculative_generate(target, ids, max_new_tokens=4, draft=glide, num_draft_tokens=2,
                                                         draft_tree=tree, do_sample=True, temperature=1.0, top_k=0,
                                                         top_p=1.0, generator=generator, return_stats=True)  # fmt: skip
        counts[torch.arange(4), out[0, 5:]] += 1
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert 0 < accepted < drafted
    for step in range(1, 4):
        expected = exact[step] * runs
        seen = expected > 5
        chi2 = ((counts[step][seen] - expected[seen]) ** 2 / expected[seen]).sum()
        assert chi2 < 45.0, f"token {step}: chi-square {chi2:.1f} over {int(seen.sum())} cells"  # p < 1e-4 at df 15


@pytest.mark.parametrize("tree", [None, (2, 2, 2)], ids=["chain", "tree"])
def test_compiled_rounds_are_one_graph_each_reused_across_calls(tree):
    """fullgraph, static shapes: a round (draft steps, verification) is one graph per number of
    pending tokens; a second call compiles nothing new; the output is the eager one."""
    torch._dynamo.reset()
    model = tiny_model("qwen3", "gqa")
    model.generation_config.eos_token_id = None
    ids = prompt()
    expected = greedy(model, ids, 30)
    longflow_patch.apply(model, budget=64)
    glide = glide_for(model, sink_tokens=2, window=8)
    counter = CompileCounterWithBackend("eager")
    options = dict(fullgraph=True, dynamic=False, backend=counter)
    frames = []
    for _ in range(2):
        got = longflow_patch.speculative_generate(model, ids, max_new_tokens=30, draft=glide, num_draft_tokens=3,
                                                  draft_tree=tree, compile=options)  # fmt: skip
        assert torch.equal(got, expected)
        frames.append(counter.frame_count)
    assert frames[0] in (1, 2) and frames[1] == frames[0]


def test_files_round_trip_and_mismatches_are_named(tmp_path):
    model = tiny_model("qwen3", "gqa")
    glide = glide_for(model, window=16)
    save_glide_draft(glide, tmp_path / "draft", steps=3)
    loaded = load_glide_draft(tmp_path / "draft", target=model)
    assert loaded.config == glide.config
    for name, tensor in glide.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    other = tiny_model("llama", "mqa")  # 1 KV head, no q/k norms
    with pytest.raises(ValueError, match=r"num_key_value_heads 2 \(target: 1\)"):
        load_glide_draft(tmp_path / "draft", target=other)
    (tmp_path / "draft" / "glide_config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ValueError, match="not a GLIDE draft config"):
        load_glide_draft(tmp_path / "draft")
    with pytest.raises(FileNotFoundError, match="no GLIDE draft config"):
        load_glide_draft(tmp_path / "nothing")


def test_clear_errors_for_bad_glide_input():
    model = tiny_model("qwen3", "gqa")
    ids = prompt()
    glide = glide_for(model)
    with pytest.raises(ValueError, match="draft_tree needs a GLIDE draft"):
        longflow_patch.speculative_generate(model, ids, max_new_tokens=4, draft_tree=(2, 2))
    with pytest.raises(ValueError, match="one width >= 1 per depth"):
        longflow_patch.speculative_generate(model, ids, max_new_tokens=4, draft=glide, draft_tree=(2, 0))
    with pytest.raises(ValueError, match=r"vocab_size 128 \(target: 16\)"):
        longflow_patch.speculative_generate(small_vocab_model(0), ids % 16, max_new_tokens=4, draft=glide)
    with pytest.raises(ValueError, match="load_glide_draft"):
        longflow_patch.speculative_generate(model, ids, max_new_tokens=4, draft=glide.to(torch.float64))


def test_recipe_smoke_run_trains_and_resumes(tmp_path, capsys):
    argv = ["--smoke", "--out", str(tmp_path / "draft"), "--checkpoint-dir", str(tmp_path / "checkpoint")]
    train_recipe.main([*argv, "--steps", "2"])
    train_recipe.main([*argv, "--steps", "4", "--resume"])
    log = capsys.readouterr().out
    assert "resumed at step 2" in log and "step     4" in log
    config, metadata = longflow_patch.glide.read_glide_config(tmp_path / "draft")
    assert metadata["steps"] == 4 and metadata["anchor_offset"] and config.window == 16


def test_distillation_loss_is_the_kl_from_the_target_at_masked_positions():
    generator = torch.Generator().manual_seed(0)
    target, draft = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    mask = torch.tensor([[False, True, True, False, True], [True, False, False, False, True]])
    expected = torch.stack([
        (target[b, t].softmax(-1) * (target[b, t].log_softmax(-1) - draft[b, t].log_softmax(-1))).sum()
        for b, t in mask.nonzero().tolist()
    ]).mean()  # fmt: skip
    torch.testing.assert_close(train_recipe.distillation_loss(draft, target, mask), expected)
    assert train_recipe.distillation_loss(target + 3.0, target, mask).abs() < 1e-6  # same distributions


def test_recipe_smoke_run_distills(tmp_path, capsys):
    argv = ["--smoke", "--distill", "--out", str(tmp_path / "draft"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    train_recipe.main([*argv, "--steps", "3"])
    losses = [float(line.split()[3]) for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and all(loss >= 0 for loss in losses)


@pytest.mark.parametrize("tree", [None, (4, 4, 4, 4)], ids=["chain", "tree"])
def test_bundled_toy_glide_draft_is_lossless_and_kept_often(tree):
    """The bundled draft (trained with anchor offsets) on the toy reasoner, CPU: output identical
    to greedy ``generate``, and most drafts kept on a chain of thought."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longflow_patch import toy

    model = AutoModelForCausalLM.from_pretrained(toy.model_path()).eval()
    model.generation_config.eos_token_id = None
    draft = load_glide_draft(toy.glide_path(), target=model)
    assert longflow_patch.glide.read_glide_config(toy.glide_path())[1]["anchor_offset"]
    problem = toy.make_problems(1, seed=3, blocks=2, with_solution=True)[0]
    ids = AutoTokenizer.from_pretrained(toy.model_path())(problem["prompt"] + problem["solution"][:700],
                                                          return_tensors="pt").input_ids  # fmt: skip
    expected = greedy(model, ids, 120)
    got, stats = longflow_patch.speculative_generate(model, ids, max_new_tokens=120, draft=draft, num_draft_tokens=4,
                                                     draft_tree=tree, return_stats=True)  # fmt: skip
    assert torch.equal(got, expected)
    assert stats.accepted_per_round > (2.0 if tree else 1.5), stats
