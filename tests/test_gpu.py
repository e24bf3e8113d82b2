"""GPU-only: the patched model through the Triton kernel, against plain transformers."""

import pytest
import torch
from transformers import DynamicCache

import longflow_patch
from longflow_patch import compat
from longflow_patch.compat import cache_keyword

from models import left_padded_prompts, tiny_model
from test_stop_check import end_tokens, record_deferred_checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_teacher_forced_logits_match_plain_transformers(arch, dtype):
    """Same tokens fed one at a time: logits of the fused-kernel path stay within half-precision
    noise of transformers' SDPA path at every step (nothing evicted)."""
    model = tiny_model(arch, "gqa", layers=2, head_dim=64, dtype=dtype).cuda()
    ids, mask = left_padded_prompts(batch=3, length=16)
    ids, mask = ids.cuda(), mask.cuda()
    tokens = torch.randint(3, 128, (3, 40), device="cuda")

    def run(cache):
        logits, attention = [], mask
        out = model(input_ids=ids, attention_mask=attention, **{cache_keyword(model): cache}, use_cache=True)
        positions = mask.sum(-1, keepdim=True) - 1
        for step in range(tokens.shape[1]):
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions + 1
            out = model(
                input_ids=tokens[:, step : step + 1],
                attention_mask=attention,
                position_ids=positions,
                **{cache_keyword(model): cache},
                use_cache=True,
            )
            logits.append(out.logits[:, -1].float())
        return torch.stack(logits, 1)

    expected = run(DynamicCache(config=model.config))
    longflow_patch.apply(model, budget=64)
    got = run(longflow_patch.new_cache(model))
    error = (got - expected).norm() / expected.norm()
    assert error < 2e-2, f"relative logit error {error:.2e}"


def test_small_budget_generation_on_gpu_is_finite_and_fixed_size():
    model = tiny_model("qwen3", "gqa", layers=2, head_dim=128, dtype=torch.bfloat16).cuda()
    longflow_patch.apply(model, budget=16)
    ids, mask = left_padded_prompts(batch=4, length=30)
    cache = longflow_patch.new_cache(model)
    out = model.generate(
        input_ids=ids.cuda(),
        attention_mask=mask.cuda(),
        max_new_tokens=300,
        min_new_tokens=300,
        do_sample=False,
        pad_token_id=0,
        **{cache_keyword(model): cache},
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (4, 330)
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert all(layer.keys.shape[2] == 16 for layer in cache.layers)


def reasonalloc_settings(path) -> dict:
    """ReasonAlloc on the 2-layer GQA tiny model, moving a slot between heads at every position."""
    from longflow_patch.profiles import BudgetProfile

    BudgetProfile.fixed([[21, 21], [43, 43]], "tiny", "reasonalloc").save(path)
    return dict(policy="reasonalloc", profile=str(path), rebalance_every=1)


@pytest.mark.parametrize("policy", ["longflow", "reasonalloc"])
def test_cuda_graph_replay_matches_compiled_step_and_never_recaptures(policy, tmp_path):
    """compile=True: transformers' compiled decode step replayed from a CUDA graph gives exactly the
    tokens of the same compiled step run without graphs, and a longer second generation replays
    the captured graph with no new capture; for ReasonAlloc, with slots moving between heads
    inside the replayed step. (Against eager the tokens may differ where inductor's fused bf16
    arithmetic flips a near-tie of a random model; the agreement is reported.)"""
    from transformers import CompileConfig

    torch._dynamo.reset()
    settings = reasonalloc_settings(tmp_path / "profile.json") if policy == "reasonalloc" else {}
    model = tiny_model("qwen3", "gqa", layers=2, head_dim=64, dtype=torch.bfloat16).cuda()
    ids, mask = left_padded_prompts(batch=4, length=20)
    ids, mask = ids.cuda(), mask.cuda()

    def generate(new_tokens):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip

    longflow_patch.apply(model, budget=32, compile=False, **settings)
    eager = generate(200)
    longflow_patch.apply(model, budget=32, compile=True, **settings)
    model.generation_config.compile_config = CompileConfig(fullgraph=True, mode=None)  # inductor, no graphs
    without_graphs = generate(200)
    torch._dynamo.reset()
    model.generation_config.compile_config = None  # apply's own settings again: CUDA graphs
    longflow_patch.apply(model, budget=32, compile=True, **settings)
    model.__dict__.pop("_compiled_call", None)
    captures = []
    original = torch.cuda.CUDAGraph.capture_begin

    def counting_capture_begin(graph, *args, **kwargs):
        captures.append(graph)
        return original(graph, *args, **kwargs)

    torch.cuda.CUDAGraph.capture_begin = counting_capture_begin
    try:
        generate(40)  # compile, warm up and capture
        first = len(captures)
        replayed = generate(200)
    finally:
        torch.cuda.CUDAGraph.capture_begin = original
    print(f"captures: {first}; tokens agreeing with eager: {(replayed == eager).float().mean().item():.3f}")
    assert first >= 1, "the decode step was not captured in a CUDA graph"
    assert len(captures) == first, f"{len(captures) - first} re-captures while generating 200 tokens"
    assert torch.equal(replayed, without_graphs), "CUDA-graph replay changed the tokens"
    assert torch.equal(replayed[:, :28], eager[:, :28]), "compiled decoding diverged from eager at once"


def test_compiled_generate_defers_its_stop_check_and_keeps_the_tokens(monkeypatch):
    """On CUDA the patched generate's own cache gets transformers' deferred stop check (the host
    never waits on a step): with every row stopping on an end token, the path with the extra,
    undone step, the tokens are those of the per-step check."""
    torch._dynamo.reset()
    model = tiny_model("qwen3", "gqa", layers=2, head_dim=64, dtype=torch.bfloat16).cuda()
    longflow_patch.apply(model, budget=32, compile=True)
    ids, mask = left_padded_prompts(batch=4, length=20)
    ids, mask = ids.cuda(), mask.cuda()

    def generate(new_tokens, eos):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=eos)  # fmt: skip

    eos = end_tokens(model, ids, mask, step=12)
    built = record_deferred_checks(monkeypatch)
    deferred = generate(60, eos)
    monkeypatch.setattr(compat, "DEFERRED_STOP_DEVICES", ())
    per_step = generate(60, eos)
    assert len(built) == 1, "the compiled generate on CUDA did not defer its stop check"
    assert deferred.shape[1] <= ids.shape[1] + 13, "the rows did not stop on their end tokens"
    assert torch.equal(deferred, per_step)
