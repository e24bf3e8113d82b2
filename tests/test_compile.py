"""Decoding compiles once (fullgraph) and never recompiles as the sequence grows."""

import pytest
import torch
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


def test_compile_flag_sets_fullgraph_cuda_graph_config_and_unapply_restores_it():
    model = tiny_model()
    before = model.generation_config.compile_config
    longflow_patch.apply(model, budget=32, compile=True)
    config = model.generation_config.compile_config
    assert config.fullgraph and config.mode == "reduce-overhead"
    longflow_patch.unapply(model)
    assert model.generation_config.compile_config is before


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
    """transformers compiles any generate call on a GPU whose cache is compileable; a model patched
    with compile=False must decode eagerly (no surprise compiles, none under device_map's hooks)."""
    model = longflow_patch.apply(tiny_model(), budget=32)
    seen = []
    monkeypatch.setattr(model, "_longflow_original_generate", lambda *args, **kwargs: seen.append(kwargs))
    model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)
    assert seen[-1]["disable_compile"] is True
    model.generation_config.compile_config = CompileConfig()  # the user's own compile settings win
    model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)
    assert "disable_compile" not in seen[-1]
    model.generation_config.compile_config = None
    longflow_patch.apply(model, budget=32, compile=True)
    model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)
    assert "disable_compile" not in seen[-1]


def test_compile_refuses_a_model_spread_over_devices():
    model = tiny_model()
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    with pytest.raises(ValueError, match="one device"):
        longflow_patch.apply(model, budget=32, compile=True)
