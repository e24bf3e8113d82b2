"""The decode step's new query and key normalised (Qwen3) and rotated by the fused op itself
(`longflow_patch.attention.new_token_preparation`): the reference against transformers' modules,
patched models against transformers with the op preparing every token, and when the model's own
modules must run instead. The kernel against the reference: ``tests/test_decode_kernel.py``."""

import pytest
import torch
from torch import nn
from transformers.models.qwen3 import modeling_qwen3

import longflow_patch
from longflow_patch import attention, cache
from longflow_patch.attention import new_token_preparation
from longflow_patch.kernels.decode_attention_reference import decode_attention_reference, prepare_new_token

from models import left_padded_prompts, tiny_model
from test_compile import compiled_generate, counting_backend
from test_equivalence import greedy
from test_fused_projections import logit_error_against_transformers


def rope_tables(batch: int, head_dim: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' RoPE ``cos``, ``sin`` ``[B, D]`` at random positions (with a Llama-3 style scale)."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 40_000, (batch, 1), generator=generator).float()
    inv_freq = 1.0 / (1_000_000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.cat([positions * inv_freq] * 2, dim=-1)
    return (angles.cos() * 1.1).to(dtype), (angles.sin() * 1.1).to(dtype)


def transformers_prepared(x, cos, sin, weight, eps):
    """``x`` ``[B, H, D]`` through transformers' Qwen3RMSNorm (when ``weight``) and RoPE, eagerly."""
    if weight is not None:
        norm = modeling_qwen3.Qwen3RMSNorm(x.shape[-1], eps).to(x.dtype)
        norm.weight.data.copy_(weight)
        x = norm(x)
    rotated, _ = modeling_qwen3.apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=1)
    return rotated


@pytest.mark.parametrize("normed", [True, False], ids=["qwen3", "rope-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_preparation_is_transformers_norm_and_rope(dtype, normed):
    """Bit for bit in float32; in half precision within one rounding of eager transformers, which
    rounds after each product of the rotation where the reference (as compiled code) rounds once."""
    torch.manual_seed(0)
    batch, heads, head_dim = 3, 4, 64
    x = (torch.randn(batch, heads, head_dim) * 3).to(dtype)
    weight = (torch.rand(head_dim) + 0.5).to(dtype) if normed else None
    cos, sin = rope_tables(batch, head_dim, dtype)
    got = prepare_new_token(x, cos, sin, weight, 1e-6)
    expected = transformers_prepared(x, cos, sin, weight, 1e-6)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(got, expected)
    else:
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(got, expected, rtol=2 * ulp, atol=2 * ulp * expected.abs().amax().item())


@pytest.fixture
def prepare_on_cpu(monkeypatch):
    """The op prepares new tokens on the CPU too (by default only on CUDA devices); records what
    every decode step handed it."""
    monkeypatch.setattr(attention, "PREPARE_IN_OP_ON_DEVICES", ("cpu",))
    calls = []

    def recording_decode_step(*args, **kwargs):
        calls.append(args)
        return decode_step(*args, **kwargs)

    decode_step = cache.decode_step
    monkeypatch.setattr(cache, "decode_step", recording_decode_step)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_patched_models_generate_like_transformers_when_the_op_prepares_tokens(arch, prepare_on_cpu):
    """Float32 models, a budget that holds every token: the op's norm and RoPE are transformers'
    bit for bit, so greedy tokens are identical."""
    model = tiny_model(arch)
    ids, mask = left_padded_prompts()
    expected = greedy(model, ids, mask)
    longflow_patch.apply(model, budget=64)
    assert torch.equal(greedy(model, ids, mask), expected)
    assert prepare_on_cpu, "no decode step ran"
    for args in prepare_on_cpu:
        cos, sin, q_norm_weight, k_norm_weight, eps = args[19:]
        assert cos.shape == sin.shape == (ids.shape[0], model.config.head_dim)
        if arch == "qwen3":
            assert q_norm_weight is not None and k_norm_weight is not None and eps == model.config.rms_norm_eps
        else:
            assert q_norm_weight is None and k_norm_weight is None


def test_compacting_policies_get_their_decode_queries_rotated(prepare_on_cpu, monkeypatch):
    """SnapKV keeps the last decode queries to re-select the cache by: the model rotates them, and
    the tokens are those of the same policy with the op never preparing a token."""
    model = longflow_patch.apply(tiny_model("qwen3"), policy="snapkv", budget=24, buffer=4)
    ids, mask = left_padded_prompts()
    got = greedy(model, ids, mask, new_tokens=30)
    assert prepare_on_cpu and all(len(args) == 19 for args in prepare_on_cpu)
    monkeypatch.setattr(attention, "PREPARE_IN_OP_ON_DEVICES", ())
    assert torch.equal(greedy(model, ids, mask, new_tokens=30), got)


def test_self_draft_speculation_stays_lossless_when_the_op_prepares_tokens(prepare_on_cpu):
    """The draft's cache (`DraftLayer`, token by token with a log) prepares tokens too."""
    model = tiny_model("qwen3")
    model.generation_config.eos_token_id = None
    ids = left_padded_prompts(batch=1)[0]
    expected = greedy(model, ids, torch.ones_like(ids), new_tokens=21)
    got = longflow_patch.speculative_generate(model, ids, max_new_tokens=21, budget=17, num_draft_tokens=4)
    assert torch.equal(got, expected)
    assert any(args[19] is not None for args in prepare_on_cpu), "the draft's steps did not prepare tokens"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_step_preparing_its_token_in_the_op_compiles_once_with_eager_tokens(arch, monkeypatch):
    """Deciding and handing over the preparation traces into the one fullgraph decode graph, whose
    every op call gets the RoPE tables (and Qwen3's norm weights)."""
    monkeypatch.setattr(attention, "PREPARE_IN_OP_ON_DEVICES", ("cpu",))
    torch._dynamo.reset()
    model = longflow_patch.apply(tiny_model(arch), budget=24)
    ids, mask = left_padded_prompts(batch=3, length=10)
    eager = greedy(model, ids, mask, new_tokens=30)
    graphs = []
    assert torch.equal(compiled_generate(model, ids, mask, 30, counting_backend(graphs)), eager)
    assert len(graphs) == 1, f"decode recompiled: {len(graphs)} graphs for 29 steps"
    calls = [node for node in graphs[0].graph.nodes if "decode_attention" in str(node.target)]
    assert len(calls) == model.config.num_hidden_layers
    # Every layer but the last may leave its scoring pass beside the next kernels (`side_stream`).
    overlap = [node.kwargs.get("overlap_scoring") for node in calls]
    assert overlap == [True] * (len(calls) - 1) + [False]
    for node in calls:
        arguments = node.args + tuple(value for name, value in node.kwargs.items() if name != "overlap_scoring")
        assert len(arguments) == 24, f"the op got no preparation: {len(arguments)} arguments"
        assert all(isinstance(table, torch.fx.Node) for table in arguments[19:21])
        assert (arguments[21] is not None) == (arch == "qwen3")


def hook(module: nn.Module) -> None:
    module.register_forward_hook(lambda *_: None)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda attn: hook(attn.q_norm), id="hooked-norm"),
        pytest.param(lambda attn: setattr(attn.k_norm, "variance_epsilon", 1e-3), id="two-epsilons"),
        pytest.param(lambda attn: setattr(attn, "q_norm", nn.LayerNorm(attn.head_dim)), id="other-norm"),
    ],
)
def test_norms_the_op_cannot_stand_in_for_run_as_the_model_has_them(change, prepare_on_cpu):
    model = longflow_patch.apply(tiny_model("qwen3"), budget=64)
    attn = model.model.layers[0].self_attn
    query = torch.zeros(1, 1, 4, attn.head_dim)
    tables = rope_tables(1, attn.head_dim, torch.float32)
    change(attn)
    longflow_patch.new_cache(model)  # decides, before decoding, which norms the op may apply
    assert new_token_preparation(attn, query, tables) is None
    assert new_token_preparation(model.model.layers[1].self_attn, query, tables) is not None


def test_tokens_are_prepared_by_the_model_on_a_cpu_and_where_dtypes_differ():
    model = longflow_patch.apply(tiny_model("qwen3"), budget=64)
    longflow_patch.new_cache(model)
    attn = model.model.layers[0].self_attn
    tables = rope_tables(1, attn.head_dim, torch.float32)
    assert new_token_preparation(attn, torch.zeros(1, 1, 4, attn.head_dim), tables) is None  # the default: CUDA only
    attention.PREPARE_IN_OP_ON_DEVICES = ("cpu",)
    try:
        assert new_token_preparation(attn, torch.zeros(1, 1, 4, attn.head_dim), tables) is not None
        assert new_token_preparation(attn, torch.zeros(1, 1, 4, attn.head_dim, dtype=torch.bfloat16), tables) is None
    finally:
        attention.PREPARE_IN_OP_ON_DEVICES = ("cuda",)


def test_incomplete_or_misshapen_preparation_is_refused():
    batch, kv_heads, group, slots, head_dim = 2, 2, 2, 8, 16
    step = dict(
        q=torch.randn(batch, kv_heads * group, head_dim),
        k_new=torch.randn(batch, kv_heads, head_dim),
        v_new=torch.randn(batch, kv_heads, head_dim),
        k_cache=torch.randn(batch, kv_heads, slots, head_dim),
        v_cache=torch.randn(batch, kv_heads, slots, head_dim),
        value_norm=torch.ones(batch, kv_heads, slots),
        slot_pos=torch.arange(slots, dtype=torch.int32).expand(batch, kv_heads, slots).contiguous(),
        write_slot=torch.zeros(batch, kv_heads, dtype=torch.int32),
        position=torch.full((batch,), 20, dtype=torch.int32),
        slot_limit=torch.full((batch, kv_heads), slots, dtype=torch.int32),
        accumulated=None,
    )
    settings = dict(scale=0.25, sink_tokens=1, recent_window=2, shared=True, score_kind=0)
    cos, sin = rope_tables(batch, head_dim, torch.float32)
    weight = torch.ones(head_dim)
    with pytest.raises(ValueError, match="needs both cos and sin"):
        decode_attention_reference(**step, **settings, cos=cos)
    with pytest.raises(ValueError, match="need both weights and cos / sin"):
        decode_attention_reference(**step, **settings, q_norm_weight=weight, k_norm_weight=weight)
    with pytest.raises(ValueError, match="need both weights"):
        decode_attention_reference(**step, **settings, cos=cos, sin=sin, q_norm_weight=weight)
    with pytest.raises(ValueError, match=r"cos must be \[B, D\]"):
        decode_attention_reference(**step, **settings, cos=cos[:1], sin=sin)
    with pytest.raises(ValueError, match=r"k_norm_weight must be a contiguous \[D\]"):
        decode_attention_reference(**step, **settings, cos=cos, sin=sin, q_norm_weight=weight,
                                   k_norm_weight=weight[:8])  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_decode_steps_prepare_tokens_in_the_kernel_with_transformers_logits(arch, compile, monkeypatch):
    """On a GPU (the default) every decode step hands the kernel its new query and key unrotated and,
    for Qwen3, unnormalised; the logits stay within bf16 noise of unpatched transformers' on the
    same tokens (tokens are not compared: a random tiny model's near-ties flip under bf16 rounding).
    Eager steps are recorded; a compiled step is not (recording in a traced function recompiles it),
    and the preparation is asked for outside it, with the tensors a step has, once `new_cache` has
    prepared the model for decoding as ``generate`` does."""
    calls = []

    def recording_decode_step(*args, **kwargs):
        calls.append(args[19:])
        return decode_step(*args, **kwargs)

    decode_step = cache.decode_step
    if not compile:
        monkeypatch.setattr(cache, "decode_step", recording_decode_step)
    model = longflow_patch.apply(tiny_model(arch, dtype=torch.bfloat16, head_dim=64).cuda(), budget=64, compile=compile)
    ids, mask = (t.cuda() for t in left_padded_prompts())
    if compile:
        longflow_patch.new_cache(model)
        attn = model.model.layers[0].self_attn
        query = torch.zeros(3, 1, 4, attn.head_dim, dtype=torch.bfloat16, device="cuda")
        tables = tuple(table.cuda() for table in rope_tables(3, attn.head_dim, torch.bfloat16))
        preparation = new_token_preparation(attn, query, tables)
        assert preparation is not None and (preparation.q_norm_weight is not None) == (arch == "qwen3")
    error = logit_error_against_transformers(model, ids, mask)
    if not compile:
        assert calls and all(len(args) == 5 for args in calls), "a decode step ran without the op preparing its token"
        assert all((args[2] is not None) == (arch == "qwen3") for args in calls)
    assert error < 2e-2, f"relative logit error {error:.2e}"
