"""The fused projections (`longflow_patch.fused_projections`: q/k/v, and the MLP's gate/up): same
parameters, same memory, the same generation as unpatched transformers, and no use of a fusion the
model has left behind."""

import tempfile

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import longflow_patch
from longflow_patch import fused_projections
from longflow_patch.compat import cache_keyword
from longflow_patch.fused_projections import GATE_UP, QKV, fusable, fuse, fused_projection, refresh_fused

from models import left_padded_prompts, tiny_model
from test_equivalence import greedy

ARCHES = ["llama", "qwen2", "qwen3"]  # qwen2: a bias on q, k and v


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers]


def fused_modules(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """Every module `apply`'s generate fuses, with the projections it fuses."""
    return [(m, QKV) for m in attention_modules(model)] + [(m, GATE_UP) for m in mlp_modules(model)]


def assert_reads_fused_rows(module: nn.Module, names: tuple[str, ...]) -> None:
    """``module``'s projections ``names`` are fused, and each parameter is its rows of the fused tensors."""
    fused = fused_projection(module)
    assert fused is not None and fused.names == names, f"{type(module).__name__} is not fused"
    for tensor, part in ((fused.weight, "weight"), (fused.bias, "bias")):
        if tensor is None:
            continue
        address = tensor.data_ptr()
        for name, rows in zip(names, fused.splits, strict=True):
            assert getattr(getattr(module, name), part).data_ptr() == address, f"{name}.{part} is not its rows"
            address += rows * tensor.stride(0) * tensor.element_size()


@pytest.fixture
def fuse_on_cpu(monkeypatch):
    """`refresh_fused` fuses on the CPU too (by default it fuses on CUDA devices only)."""
    monkeypatch.setattr(fused_projections, "FUSE_ON_DEVICES", {QKV: ("cpu", "cuda"), GATE_UP: ("cpu", "cuda")})


@pytest.mark.parametrize("arch", ARCHES)
def test_fused_projection_generates_like_transformers_in_the_same_memory(arch, fuse_on_cpu):
    model = tiny_model(arch)
    ids, mask = left_padded_prompts()
    expected = greedy(model, ids, mask)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    longflow_patch.apply(model, policy="longflow", budget=64)  # holds every token: nothing is evicted
    got = greedy(model, ids, mask)
    assert torch.equal(got, expected)
    for module, names in fused_modules(model):
        assert_reads_fused_rows(module, names)
    assert (fused_projection(attention_modules(model)[0]).bias is None) == (arch != "qwen2")
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("bias", [False, True])
def test_fused_mlp_computes_transformers_mlp(bias, fuse_on_cpu):
    """The MLP's forward with gate and up as one matmul gives transformers' MLP output (with biases,
    as Llama's ``mlp_bias`` makes), and `unapply` gives back its own forward."""
    model = tiny_model("llama")
    mlp = mlp_modules(model)[0]
    if bias:
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.bias = nn.Parameter(torch.randn(linear.out_features))
    x = torch.randn(3, 5, model.config.hidden_size)
    with torch.no_grad():
        expected = mlp(x)
        longflow_patch.new_cache(longflow_patch.apply(model, budget=64))
        assert_reads_fused_rows(mlp, GATE_UP)
        assert (fused_projection(mlp).bias is None) != bias
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
        for tensor in fused_projection(mlp)[:2]:  # the fused rows are the parameters: the forward sees them
            if tensor is not None:
                tensor.zero_()
        assert torch.equal(mlp(x), mlp.down_proj(torch.zeros(3, 5, model.config.intermediate_size)))
    longflow_patch.unapply(model)
    assert "forward" not in vars(mlp) and fused_projection(mlp) is None


def test_the_op_reads_each_new_value_from_the_fused_output_uncopied(fuse_on_cpu, monkeypatch):
    """A decode step hands the op the new value as a slice of the fused projection's output rows
    (the op reads through strides), not a contiguous copy of it."""
    from longflow_patch import cache

    row_strides = []

    def recording_decode_step(q, k_new, v_new, *args, **kwargs):
        row_strides.append(v_new.stride())
        return decode_step(q, k_new, v_new, *args, **kwargs)

    decode_step = cache.decode_step
    monkeypatch.setattr(cache, "decode_step", recording_decode_step)
    model = longflow_patch.apply(tiny_model("llama"), budget=64)
    ids, mask = left_padded_prompts()
    greedy(model, ids, mask)
    fused = fused_projection(attention_modules(model)[0])
    head_dim = model.config.head_dim
    assert row_strides and set(row_strides) == {(sum(fused.splits), head_dim, 1)}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_fused_model_saves_and_loads_its_own_weights(arch, fuse_on_cpu):
    model = longflow_patch.apply(tiny_model(arch), budget=64)
    longflow_patch.new_cache(model)  # fuses
    assert all(fused_projection(module) is not None for module, _ in fused_modules(model))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert state.keys() == loaded.state_dict().keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in loaded.state_dict().items())


def test_a_cast_model_stops_using_the_old_fusion_and_fuses_again(fuse_on_cpu):
    model = longflow_patch.apply(tiny_model("qwen2"), budget=64)
    ids, mask = left_padded_prompts()
    greedy(model, ids, mask)
    modules = [module for module, _ in fused_modules(model)]
    old = [fused_projection(module).weight for module in modules]
    model.to(torch.float64)  # new storage for every parameter: the fused tensors are stale
    assert all(fused_projection(module) is None for module in modules)
    with torch.no_grad():
        # The forward falls back to the three projections: float64 logits, the model's own weights.
        logits = model(ids, attention_mask=mask, **{cache_keyword(model): longflow_patch.new_cache(model)}).logits
    assert logits.dtype == torch.float64
    for module, weight in zip(modules, old, strict=True):
        assert fused_projection(module).weight is not weight and fused_projection(module).weight.dtype == torch.float64
    unpatched = longflow_patch.unapply(model)
    with torch.no_grad():
        torch.testing.assert_close(logits, unpatched(ids, attention_mask=mask).logits, rtol=1e-10, atol=1e-10)


def test_stale_fusion_is_never_read_before_a_refresh():
    model = longflow_patch.apply(tiny_model("llama"), budget=64)
    ids, mask = left_padded_prompts()
    for module, names in fused_modules(model):
        fuse(module, names)
    with torch.no_grad():
        for module, names in fused_modules(model):
            fused = fused_projection(module)
            second = getattr(module, names[1])
            second.weight.data = second.weight.data.clone()  # k / up no longer the fused rows
            fused.weight.zero_()  # so a forward reading the fusion would be visibly wrong
        got = model(ids, attention_mask=mask, **{cache_keyword(model): longflow_patch.new_cache(model)}).logits
    assert all(fused_projection(module) is None for module, _ in fused_modules(model))
    assert torch.isfinite(got).all() and got.abs().amax() > 0
    # new_cache on a CPU model dropped the stale fusions (and, on a CPU, made no new one).
    assert all(not hasattr(module, "_longflow_fused") for module, _ in fused_modules(model))


def test_loading_weights_into_a_fused_model_updates_the_fusion(fuse_on_cpu):
    model = longflow_patch.apply(tiny_model("qwen3"), budget=64)
    longflow_patch.new_cache(model)  # fuses
    other = tiny_model("qwen3", seed=1)
    model.load_state_dict(other.state_dict())  # copies into the parameters in place
    ids, mask = left_padded_prompts()
    assert all(fused_projection(module) is not None for module, _ in fused_modules(model))
    assert torch.equal(greedy(model, ids, mask), greedy(other, ids, mask))


def test_fusing_under_inference_mode_leaves_normal_parameters(fuse_on_cpu):
    model = longflow_patch.apply(tiny_model("qwen3"), budget=64)
    with torch.inference_mode():
        longflow_patch.new_cache(model)  # fuses here, as a generate under inference_mode would
    assert all(not p.is_inference() for p in model.parameters())
    model.load_state_dict(tiny_model("qwen3", seed=1).state_dict())  # in place: refused on inference tensors
    assert all(fused_projection(module) is not None for module, _ in fused_modules(model))


def test_speculative_generate_fuses_a_cast_model_afresh(fuse_on_cpu):
    model = longflow_patch.apply(tiny_model("qwen3"), budget=64)
    ids = left_padded_prompts(batch=1)[0]
    expected = greedy(model, ids, torch.ones_like(ids), new_tokens=12)
    model.to(torch.float64)  # the fusion made by generate is stale now
    got = longflow_patch.speculative_generate(model.to(torch.float32), ids, max_new_tokens=12, budget=32)
    assert all(fused_projection(module) is not None for module, _ in fused_modules(model))
    assert torch.equal(got, expected)


def test_unapply_forgets_the_fusion_and_keeps_the_weights(fuse_on_cpu):
    model = tiny_model("qwen3")
    ids, mask = left_padded_prompts()
    expected = greedy(model, ids, mask)
    longflow_patch.apply(model, budget=64)
    greedy(model, ids, mask)
    longflow_patch.unapply(model)
    assert all(not hasattr(module, "_longflow_fused") for module, _ in fused_modules(model))
    assert torch.equal(greedy(model, ids, mask), expected)


def test_projections_that_are_not_plain_linears_stay_apart(fuse_on_cpu):
    class Adapter(nn.Linear):  # e.g. a LoRA layer: its forward is more than the matmul
        pass

    hooked, wrapped, biased, plain = (tiny_model("qwen3").model.layers[0].self_attn for _ in range(4))
    hooked.k_proj.register_forward_hook(lambda *args: None)
    wrapped.v_proj.__class__ = Adapter
    biased.q_proj.bias = nn.Parameter(torch.zeros(biased.q_proj.out_features))  # a bias on q only
    assert [fusable(m, QKV) for m in (hooked, wrapped, biased, plain)] == [False, False, False, True]
    refresh_fused([hooked, wrapped, biased, plain], QKV)
    assert [fused_projection(m) is not None for m in (hooked, wrapped, biased, plain)] == [False, False, False, True]

    hooked, plain = (tiny_model("qwen3").model.layers[0].mlp for _ in range(2))
    hooked.up_proj.register_forward_pre_hook(lambda *args: None)
    refresh_fused([hooked, plain], GATE_UP)
    assert [fused_projection(m) is not None for m in (hooked, plain)] == [False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHES)
def test_cuda_generate_fuses_in_the_same_memory_and_compiled_logits_match_transformers(arch):
    """On a GPU `apply`'s generate fuses (no memory added), and compiled decoding's logits through
    the fused projection stay within bf16 noise of unpatched transformers on the same tokens
    (tokens are not compared: a random tiny model's near-ties flip under bf16 rounding)."""
    model = tiny_model(arch, dtype=torch.bfloat16, head_dim=64).cuda()
    ids, mask = (t.cuda() for t in left_padded_prompts())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    longflow_patch.new_cache(longflow_patch.apply(model, budget=64, compile=True))  # fuses
    torch.cuda.synchronize()
    modules = fused_modules(model)
    for module, names in modules:
        assert_reads_fused_rows(module, names)
    # The old weights' blocks are freed as the fused ones are made; the allocator rounds each to 512 bytes.
    assert torch.cuda.memory_allocated() - before <= 2 * 512 * len(modules)
    error = logit_error_against_transformers(model, ids, mask)
    assert error < 2e-2, f"relative logit error {error:.2e}"


def logit_error_against_transformers(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Greedy 16 tokens with the patched ``model``, then `unapply` it: the relative error of the
    generated steps' logits against unpatched transformers' teacher-forced logits on the same tokens."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    got = torch.stack(out.logits, dim=1).float()
    longflow_patch.unapply(model)
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1] :])], dim=1)
    with torch.no_grad():
        expected = model(out.sequences, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1].float()
    return ((got - expected).norm() / expected.norm()).item()
