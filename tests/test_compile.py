"""Decoding compiles once (fullgraph) and never recompiles as the sequence grows."""

import warnings

import pytest
import torch
import torch._inductor.config
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import CompileConfig

import longflow_patch
from longflow_patch.compat import cache_keyword

from models import left_padded_prompts, tiny_model


def counting_backend(graphs: list):
    """A torch.compile backend that records each graph it compiles and runs it eagerly. (A plain
    function: transformers deep-copies its compile config, and functions survive that as is.)"""

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return backend


def compiled_generate(model, ids, mask, new_tokens, backend):
    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True  # transformers compiles decode steps only on accelerators otherwise
    model.generation_config.compile_config = config
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)  # fmt: skip


@pytest.mark.parametrize("policy", ["longflow", "h2o", "streamingllm"])
def test_decode_step_compiles_once_through_transformers_generate(policy):
    torch._dynamo.reset()
    model = tiny_model("qwen3", "gqa")
    ids, mask = left_padded_prompts(batch=3, length=10)
    longflow_patch.apply(model, policy=policy, budget=24)
    eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=60, min_new_tokens=60, do_sample=False,
                           pad_token_id=0)  # fmt: skip
    graphs = []
    compiled = compiled_generate(model, ids, mask, 60, counting_backend(graphs))
    assert len(graphs) == 1, f"decode recompiled: {len(graphs)} graphs for 59 steps"
    assert torch.equal(compiled, eager)


def test_inductor_compiled_generate_gives_eager_tokens():
    """The real backend (inductor, on the CPU here; the tests above run the captured graphs eagerly):
    the lowered graph, the op and its in-place writes included, gives eager's tokens."""
    torch._dynamo.reset()
    model = longflow_patch.apply(tiny_model("qwen3", "gqa"), budget=24)
    ids, mask = left_padded_prompts(batch=3, length=10)
    eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                           pad_token_id=0)  # fmt: skip
    with torch._inductor.config.patch(force_disable_caches=True):
        assert torch.equal(compiled_generate(model, ids, mask, 40, "inductor"), eager)


def generate_kwargs(model, monkeypatch) -> list[dict]:
    """The keyword arguments each ``generate`` call of ``model`` hands to transformers (which is not run)."""
    seen = []
    monkeypatch.setattr(model, "_longflow_original_generate", lambda *args, **kwargs: seen.append(kwargs))
    return seen


def run_generate(model) -> None:
    model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)


def test_compiling_generate_hands_transformers_a_fullgraph_cuda_graph_config_and_leaves_the_model_config():
    model = tiny_model()
    longflow_patch.apply(model, budget=32, compile=True)
    seen = generate_kwargs(model, monkeypatch=pytest.MonkeyPatch())
    run_generate(model)
    config = seen[-1]["compile_config"]
    assert config.fullgraph and config.mode == "reduce-overhead" and "disable_compile" not in seen[-1]
    assert model.generation_config.compile_config is None, "apply must not edit the model's generation config"
    longflow_patch.unapply(model)
    assert not hasattr(model, "_longflow_compile")


def test_compiled_decode_compiles_static_shapes_then_one_dynamic_graph(monkeypatch):
    """`apply`'s compile settings, through transformers' generate (a counting backend in place of
    inductor, on the CPU): the first `STATIC_SHAPES` cache shapes compile with static shapes (a
    dynamic-shape step idled longer on an H100), later ones share dynamic-shape graphs, so that
    twelve shapes, each after `unapply`, stay under torch's recompile limit, which fails a
    ``fullgraph`` compile; every call gives eager's tokens."""
    torch._dynamo.reset()
    graphs = []
    backend = counting_backend(graphs)

    def cpu_config(**settings):
        config = CompileConfig(**{**settings, "backend": backend, "mode": None})
        config._compile_all_devices = True
        return config

    monkeypatch.setattr(longflow_patch.patch, "CompileConfig", cpu_config)
    model = tiny_model("qwen3", "gqa")
    shapes = [(2, 16), (3, 16), (2, 24), (4, 16), (5, 16), (6, 16), (3, 32), (7, 24), (2, 16), (8, 40), (9, 16),
              (1, 16)]  # fmt: skip
    symbolic = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one new-shape warning per shape
        for batch, budget in shapes:
            ids, mask = left_padded_prompts(batch=batch, length=8)
            outputs = []
            longflow_patch.unapply(model)  # the shapes met are kept: the compiled graphs are
            for compile in (False, True):
                longflow_patch.apply(model, budget=budget, compile=compile)
                outputs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                                              do_sample=False, pad_token_id=0))  # fmt: skip
            assert torch.equal(outputs[1], outputs[0]), f"batch {batch}, budget {budget}"
            symbolic.append([isinstance(node.meta.get("example_value"), torch.SymInt) for node in graphs[-1].graph.nodes
                             if node.op == "placeholder"])  # fmt: skip
    static = longflow_patch.patch.STATIC_SHAPES
    assert not any(any(graph) for graph in symbolic[:static]), "the first shapes compiled with dynamic shapes"
    assert any(symbolic[static]), "the shape after the static ones compiled with static shapes"
    assert len(graphs) < torch._dynamo.config.recompile_limit, f"{len(graphs)} graphs for {len(shapes)} shapes"


def test_compacting_policies_refuse_compile():
    with pytest.raises(ValueError, match="runs eagerly"):
        longflow_patch.apply(tiny_model(), policy="snapkv", budget=128, compile=True)
    assert not longflow_patch.new_cache(longflow_patch.apply(tiny_model(), policy="rkv", budget=128)).is_compileable


def test_user_compiled_forward_is_one_graph_for_every_decode_step():
    """A user's own torch.compile(fullgraph=True) of the forward: one graph, reused at every length."""
    torch._dynamo.reset()
    model = tiny_model("llama", "gqa")
    longflow_patch.apply(model, budget=16)
    counter = CompileCounterWithBackend("eager")
    step = torch.compile(model.forward, fullgraph=True, backend=counter, dynamic=False)
    ids = torch.randint(3, 128, (2, 9))
    cache = longflow_patch.new_cache(model)
    logits = model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True).logits
    reference_cache = longflow_patch.new_cache(model)
    model(input_ids=ids, **{cache_keyword(model): reference_cache}, use_cache=True)
    token = logits[:, -1:].argmax(-1)
    for position in range(9, 49):
        positions = torch.full((2, 1), position)
        compiled_logits = step(
            input_ids=token, position_ids=positions, **{cache_keyword(model): cache}, use_cache=True
        ).logits
        eager_logits = model(input_ids=token, position_ids=positions, **{cache_keyword(model): reference_cache},
                             use_cache=True).logits  # fmt: skip
        torch.testing.assert_close(compiled_logits, eager_logits)
        token = compiled_logits[:, -1:].argmax(-1)
    assert counter.frame_count == 1


def test_generate_is_eager_unless_compile_is_asked_for(monkeypatch):
    """transformers compiles any generate call on a GPU whose cache is compileable; a model that
    decodes eagerly (here: "auto" on the CPU, or compile=False) must not be compiled behind its
    back (no surprise compiles, none under device_map's hooks)."""
    for compile in ("auto", False):
        model = longflow_patch.apply(tiny_model(), budget=32, compile=compile)
        seen = generate_kwargs(model, monkeypatch)
        run_generate(model)
        assert seen[-1]["disable_compile"] is True and "compile_config" not in seen[-1]
    model.generation_config.compile_config = CompileConfig()  # the user's own compile settings win
    run_generate(model)
    assert "disable_compile" not in seen[-1] and "compile_config" not in seen[-1]
    longflow_patch.apply(model, budget=32, compile=True)
    run_generate(model)
    assert "disable_compile" not in seen[-1] and "compile_config" not in seen[-1]
    model.generation_config.compile_config = None
    run_generate(model)
    assert seen[-1]["compile_config"].mode == "reduce-overhead" and "disable_compile" not in seen[-1]


def on_devices(monkeypatch, *devices: str) -> None:
    """Make every patched model look placed on ``devices`` (the weights stay on the CPU)."""
    monkeypatch.setattr(longflow_patch.patch, "_placement", lambda model: set(devices))


def test_auto_compiles_on_one_cuda_device_and_is_decided_at_each_generate_call(monkeypatch):
    model = longflow_patch.apply(tiny_model(dtype=torch.bfloat16), budget=32)  # compile="auto", on the CPU
    seen = generate_kwargs(model, monkeypatch)
    run_generate(model)
    assert seen[-1].get("disable_compile") is True
    on_devices(monkeypatch, "cuda:0")  # the model moved to a GPU after apply: no new apply needed
    run_generate(model)
    assert seen[-1]["compile_config"].mode == "reduce-overhead" and "disable_compile" not in seen[-1]
    assert longflow_patch.patch.compile_blocker(model, model._longflow_policy) is None
    on_devices(monkeypatch, "cuda:0", "cuda:1")  # device_map across two GPUs
    run_generate(model)
    assert seen[-1].get("disable_compile") is True


@pytest.mark.parametrize(
    ("policy", "settings", "dtype", "reason"),
    [
        ("snapkv", dict(budget=128), torch.bfloat16, "re-selects its cache on the host"),
        ("rkv", dict(budget=128), torch.bfloat16, "re-selects its cache on the host"),
        ("full", {}, torch.bfloat16, "sizes its cache per call"),
        ("longflow", dict(budget=32), torch.float32, "does not serve torch.float32"),
    ],
)
def test_auto_decodes_eagerly_where_compiling_would_not_pay(monkeypatch, policy, settings, dtype, reason):
    """Compacting policies (host-side re-selection), a cache sized per call (a compile per length)
    and the float32 fallback to the PyTorch reference decode eagerly under "auto", on a GPU too."""
    on_devices(monkeypatch, "cuda:0")
    model = longflow_patch.apply(tiny_model(dtype=dtype), policy=policy, **settings)
    assert reason in longflow_patch.patch.compile_blocker(model, model._longflow_policy)
    seen = generate_kwargs(model, monkeypatch)
    run_generate(model)
    assert seen[-1].get("disable_compile") is True


def test_compile_refuses_values_other_than_true_false_and_auto():
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        longflow_patch.apply(tiny_model(), budget=32, compile="yes")


def test_compiled_generate_warns_once_per_new_cache_shape():
    """On the CPU transformers decodes eagerly even when asked to compile; the patched generate
    still reuses one cache and tracks its shapes as it does on a GPU."""
    model = longflow_patch.apply(tiny_model(), budget=16, compile=True)
    ids, mask = left_padded_prompts(batch=3, length=6)

    def generate(batch):
        model.generate(input_ids=ids[:batch], attention_mask=mask[:batch], max_new_tokens=2, pad_token_id=0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(2)  # the first shape: no warning
        generate(2)
    with pytest.warns(UserWarning, match="new shape \\(batch 3, 16 slots"):
        generate(3)
    longflow_patch.apply(model, budget=24, compile=True)
    with pytest.warns(UserWarning, match="new shape \\(batch 3, 24 slots"):
        generate(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(3)  # met just before


def test_compile_refuses_a_model_spread_over_devices():
    model = tiny_model()
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    with pytest.raises(ValueError, match="one device"):
        longflow_patch.apply(model, budget=32, compile=True)
