"""`speculative_generate`: greedy output identical to ``generate``, caches consistent after
rollback, speculative sampling keeps the target's distribution, clear errors."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import Qwen3Config, Qwen3ForCausalLM, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import longflow_patch
from longflow_patch.compat import cache_keyword
from longflow_patch.sampling import Sampler
from longflow_patch.speculative_cache import DraftCache

from models import ARCHITECTURES, tiny_model


def greedy(model, ids, new_tokens, **kwargs):
    return model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)


def prompt(length=12, seed=0, vocab=128):
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize(("k", "budget"), [(1, 64), (3, 64), (4, 17), (8, 21)])
def test_greedy_output_identical_to_generate(arch, k, budget):
    """Budgets 17 and 21 are below prompt + output (12 + 29): the draft evicts, acceptance drops."""
    model = tiny_model(arch, "gqa")
    model.generation_config.eos_token_id = None
    ids = prompt()
    expected = greedy(model, ids, 29)
    got, stats = longflow_patch.speculative_generate(
        model, ids, max_new_tokens=29, budget=budget, num_draft_tokens=k, return_stats=True
    )
    assert torch.equal(got, expected)
    assert stats.new_tokens == 29 and stats.accepted <= stats.drafted
    if budget == 64:
        assert stats.acceptance_rate == 1.0  # nothing evicted: the self-draft is the target
    else:
        assert stats.acceptance_rate < 1.0


def test_stops_after_eos_and_keeps_left_padding_of_the_prompt():
    model = tiny_model("qwen3", "mqa")
    model.generation_config.eos_token_id = None
    ids = prompt(10, seed=3)
    free = greedy(model, ids, 20)[0, 10:]
    eos = next(int(t) for i, t in enumerate(free) if i >= 4 and int(t) not in free[:i].tolist())
    model.generation_config.eos_token_id = eos
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    expected = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    got = longflow_patch.speculative_generate(model, padded, attention_mask=mask, max_new_tokens=20, num_draft_tokens=3)
    assert got[0, -1] == eos and got.shape[1] < padded.shape[1] + 20
    assert torch.equal(got, expected)


def test_separate_draft_model_and_unpatched_models_are_restored():
    target = tiny_model("qwen3", "gqa", layers=2, seed=0)
    target.generation_config.eos_token_id = None
    draft = tiny_model("llama", "mqa", layers=1, seed=1)
    ids = prompt()
    expected = greedy(target, ids, 17)
    got, stats = longflow_patch.speculative_generate(target, ids, max_new_tokens=17, draft=draft, budget=20,
                                                     num_draft_tokens=4, return_stats=True)  # fmt: skip
    assert torch.equal(got, expected)
    assert stats.acceptance_rate < 1.0  # an unrelated draft: rejections were exercised
    for model in (target, draft):
        assert "_longflow_policy" not in vars(model)
        assert all("forward" not in vars(module) for module in model.modules())


def test_a_patched_target_stays_patched():
    model = longflow_patch.apply(tiny_model("qwen2", "gqa"), budget=64)
    model.generation_config.eos_token_id = None
    ids = prompt()
    expected = greedy(model, ids, 9)  # the patched generate, with a budget that holds everything
    assert torch.equal(longflow_patch.speculative_generate(model, ids, max_new_tokens=9, budget=32), expected)
    assert "_longflow_policy" in vars(model)


def snapshot(cache: DraftCache) -> list[torch.Tensor]:
    names = ("keys", "values", "value_norm", "slot_pos", "write_slot", "token_count")
    return [getattr(layer, name).clone() for layer in cache.layers for name in names]


def feed(model, cache, tokens, start):
    positions = torch.arange(start, start + tokens.shape[1])[None]
    return model(input_ids=tokens, position_ids=positions, **{cache_keyword(model): cache}, use_cache=True).logits


@pytest.mark.parametrize("together", [False, True], ids=["one-per-forward", "one-forward"])
def test_draft_rollback_restores_the_cache_bit_for_bit(together):
    """A draft that saw rejected tokens and undid them equals one that never saw them."""
    model = longflow_patch.apply(tiny_model("qwen3", "gqa"), budget=16)
    policy = longflow_patch.make_policy("longflow", budget=16)
    kept, rejected = DraftCache(policy, 2, 4), DraftCache(policy, 2, 4)
    ids = prompt(30, seed=1)
    for cache in (kept, rejected):
        feed(model, cache, ids[:, :12], 0)
        for i in range(12, 24):  # past the budget: every step evicts
            feed(model, cache, ids[:, i : i + 1], i)
        cache.commit()
    if together:
        feed(model, rejected, ids[:, 24:28], 24)
    else:
        for i in range(24, 28):
            feed(model, rejected, ids[:, i : i + 1], i)
    assert any(not torch.equal(a, b) for a, b in zip(snapshot(kept), snapshot(rejected), strict=True))
    rejected.rollback(4)
    for a, b in zip(snapshot(kept), snapshot(rejected), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(feed(model, kept, ids[:, 24:25], 24), feed(model, rejected, ids[:, 24:25], 24))


def test_draft_cache_refuses_policies_with_running_state():
    with pytest.raises(ValueError, match="cannot undo"):
        DraftCache(longflow_patch.make_policy("h2o", budget=32), 2, 4)


def test_sampler_warps_like_generate():
    logits = torch.randn(3, 50) * 3
    sampler = Sampler(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    expected = logits.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        expected = warper(None, expected)
    torch.testing.assert_close(sampler.probs(logits), expected.softmax(dim=-1))


def small_vocab_model(seed: int, vocab: int = 16) -> Qwen3ForCausalLM:
    """A one-layer model whose next-token distributions are far from uniform."""
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                         eos_token_id=None, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def exact_marginals(model, ids, steps: int) -> torch.Tensor:
    """``[steps, V]``: the target's exact distribution of each of the next ``steps`` tokens."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        joint = torch.ones(1)
        for step in range(steps):
            prefixes = torch.cartesian_prod(*[torch.arange(vocab)] * step).view(-1, step) if step else None
            batch = ids.expand(vocab**step, -1) if step == 0 else torch.cat([ids.expand(vocab**step, -1), prefixes], 1)
            probs = model(input_ids=batch).logits[:, -1].float().softmax(dim=-1)  # [V^step, V]
            joint = (joint[:, None] * probs).reshape(-1)
        return torch.stack(
            [joint.view([vocab] * steps).sum(dim=[d for d in range(steps) if d != s]) for s in range(steps)]
        )


def test_speculative_sampling_keeps_the_target_distribution():
    target, draft = small_vocab_model(0), small_vocab_model(1)
    longflow_patch.apply(target, budget=32)
    longflow_patch.apply(draft, budget=32)
    ids = torch.tensor([[3, 7, 1, 12, 5]])
    exact = exact_marginals(target, ids, 4)
    draft_first = draft(input_ids=ids).logits[0, -1].float().softmax(-1)
    assert (draft_first - exact[0]).abs().sum() / 2 > 0.3  # the draft is a poor guess: rejections matter
    generator = torch.Generator().manual_seed(0)
    runs, drafted, accepted = 1500, 0, 0
    counts = torch.zeros_like(exact)
    for _ in range(runs):
        out, stats = longflow_patch.speculative_generate(target, ids, max_new_tokens=4, draft=draft, budget=32,
                                                         num_draft_tokens=2, do_sample=True, temperature=1.0,
                                                         top_k=0, top_p=1.0, generator=generator,
                                                         return_stats=True)  # fmt: skip
        counts[torch.arange(4), out[0, 5:]] += 1
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert 0 < accepted < drafted
    for step in range(1, 4):  # positions decided by the accept / resample rule
        expected = exact[step] * runs
        seen = expected > 5
        chi2 = ((counts[step][seen] - expected[seen]) ** 2 / expected[seen]).sum()
        assert chi2 < 45.0, f"token {step}: chi-square {chi2:.1f} over {int(seen.sum())} cells"  # p < 1e-4 at df 15


def test_clear_errors_for_bad_input():
    model = tiny_model("qwen3", "gqa")
    ids = prompt()
    with pytest.raises(ValueError, match="batch size 1"):
        longflow_patch.speculative_generate(model, ids.expand(2, -1), max_new_tokens=4)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        longflow_patch.speculative_generate(model, ids, max_new_tokens=4, num_draft_tokens=0)
    with pytest.raises(ValueError, match="too small"):
        longflow_patch.speculative_generate(model, ids, max_new_tokens=4, budget=4)
    with pytest.raises(ValueError, match="vocabulary"):
        longflow_patch.speculative_generate(model, ids, max_new_tokens=4, draft=small_vocab_model(0))
    with pytest.raises(TypeError, match="does not support"):
        longflow_patch.speculative_generate(torch.nn.Linear(2, 2), ids, max_new_tokens=4)
    assert all("forward" not in vars(module) for module in model.modules())


def test_compiled_rounds_are_graphs_reused_across_calls():
    """Compiled (fullgraph, static shapes): a round (draft chain and verification) is one graph per
    number of pending tokens (1, or 2 after a round that accepted every draft); a second call
    compiles nothing new."""
    torch._dynamo.reset()
    model = tiny_model("qwen3", "gqa")
    model.generation_config.eos_token_id = None
    ids = prompt()
    expected = greedy(model, ids, 30)
    longflow_patch.apply(model, budget=64)  # patched once, so calls do not re-patch (and recompile)
    counter = CompileCounterWithBackend("eager")
    options = dict(fullgraph=True, dynamic=False, backend=counter)
    frames = []
    for budget in (20, 20):
        got = longflow_patch.speculative_generate(model, ids, max_new_tokens=30, budget=budget, compile=options)
        assert torch.equal(got, expected)
        frames.append(counter.frame_count)
    assert frames[0] in (1, 2) and frames[1] == frames[0]


def test_rollback_past_the_log_is_refused():
    model = longflow_patch.apply(tiny_model("qwen3", "gqa"), budget=16)
    cache = DraftCache(longflow_patch.make_policy("longflow", budget=16), 2, 2)
    ids = prompt(16)
    feed(model, cache, ids[:, :12], 0)
    for i in range(12, 15):
        feed(model, cache, ids[:, i : i + 1], i)
    with pytest.raises(ValueError, match="cannot undo 3 steps"):
        cache.rollback(3)
