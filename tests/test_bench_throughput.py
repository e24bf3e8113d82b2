"""``recipes/bench_throughput.py``'s full-cache baseline: its decode loop generates what transformers
generates, and one compile of the loop serves every batch size and cache length; its unfused rows run
the q/k/v projections apart, and its capped-register rows another launch of the attention pass; its
roofline counts what a step must read."""

import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import Qwen3Config, Qwen3ForCausalLM

import longflow_patch
from longflow_patch import fused_projections
from longflow_patch.compat import cache_keyword
from longflow_patch.kernels import decode_attention
from longflow_patch.speculative_cache import SpeculativeCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decode_op
import profile_step
import recount_roofline
from common import step_floor_seconds, step_read_bytes
from models import tiny_model
from recipe_loader import load_recipe

throughput = load_recipe("bench_throughput.py")


def test_full_cache_loop_generates_the_greedy_tokens_of_transformers():
    model = tiny_model("qwen3", "gqa", layers=2)
    prompt = torch.randint(3, 128, (2, 9))
    expected = model.generate(input_ids=prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    longflow_patch.apply(model, compile=False)
    cache = SpeculativeCache(model.config.num_hidden_layers, capacity=9 + 12)
    logits = model(input_ids=prompt, use_cache=True, **{cache_keyword(model): cache}).logits
    token, tokens = logits[:, -1:].argmax(-1), []
    for position in range(9, 9 + 11):
        tokens.append(token)
        token = throughput._greedy_step(model, cache_keyword(model), cache, token, torch.full((2, 1), position))
    tokens.append(token)
    assert torch.equal(torch.cat([prompt, *tokens], dim=1), expected)


def test_one_compile_of_the_loop_serves_every_batch_and_cache_length():
    torch._dynamo.reset()
    model = longflow_patch.apply(tiny_model("qwen3", "gqa", layers=2), compile=False)
    counter = CompileCounterWithBackend("eager")
    step = throughput.compiled_greedy_step("test", backend=counter)
    for batch, capacity, context in ((2, 40, 20), (3, 56, 30), (5, 24, 10)):
        cache = throughput.full_cache(model, batch, capacity)

        def set_context(cache=cache, context=context):
            for layer in cache.layers:
                layer.length.fill_(context)

        seconds, cost = throughput.loop_step_seconds(model, step, cache, batch, context, 4, set_context)
        assert seconds > 0 and cost["first_call_s"] > 0
        assert all(int(layer.length) == context + 4 for layer in cache.layers), "each step appends one token"
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for three shapes"


@pytest.mark.parametrize(
    ("kind", "apart"),
    [("longflow-compiled-unfused", ("self_attn", "mlp")), ("longflow-compiled-gate-up-apart", ("mlp",))],
)
def test_rows_that_run_projections_apart_leave_later_rows_fused(kind, apart, monkeypatch):
    """``longflow-compiled-unfused`` rows run q/k/v and gate/up apart, ``...-gate-up-apart`` rows only
    gate/up; the other projections stay fused, and later rows fuse everything again."""
    fusing = {names: ("cpu",) for names in fused_projections.FUSE_ON_DEVICES}  # fuse here as on a GPU
    monkeypatch.setattr(fused_projections, "FUSE_ON_DEVICES", fusing)
    model = longflow_patch.apply(tiny_model("qwen3", "gqa", layers=2), budget=64, compile=False)
    modules = {part: [getattr(layer, part) for layer in model.model.layers] for part in ("self_attn", "mlp")}
    prompt = torch.randint(3, 128, (2, 9))

    def fused_parts() -> set[str]:
        generate = model.generate(input_ids=prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert generate.shape == (2, 11)
        fused = fused_projections.fused_projection
        return {part for part, ms in modules.items() if all(fused(m) is not None for m in ms)}

    assert fused_parts() == {"self_attn", "mlp"}
    with throughput.generate_variant(model, kind):
        assert fused_parts() == {"self_attn", "mlp"} - set(apart)
        assert all(fused_projections.fused_projection(m) is None for part in apart for m in modules[part])
    assert fused_parts() == {"self_attn", "mlp"}


def test_capped_register_rows_plan_the_attention_pass_with_their_launch(monkeypatch):
    """``longflow-compiled-capped-registers`` rows run the op with `CAPPED_ATTEND_LAUNCH` and drop the
    compiled graphs on the way in and out (they would replay the other launch), not the patch; later
    rows get the default launch again."""
    model = longflow_patch.apply(tiny_model("qwen3", "gqa", layers=2), budget=64, compile=False)
    capped = throughput.CAPPED_ATTEND_LAUNCH
    assert capped != decode_attention.DEFAULT_ATTEND_LAUNCH
    planned = []
    plan_decode = decode_attention.plan_decode
    monkeypatch.setattr(decode_attention, "plan_decode", lambda *args: planned.append(args[10]) or plan_decode(*args))

    def decode_step():
        inputs = decode_op.make_inputs(1, 40)
        decode_attention.decode_attention_triton(**inputs, **decode_op.SETTINGS)

    model.__dict__["_compiled_call"] = "graphs compiled by an earlier row"
    with throughput.generate_variant(model, "longflow-compiled-capped-registers"):
        assert "_compiled_call" not in model.__dict__
        assert model.__dict__.get("_longflow_policy") is not None, "the row must still decode with LongFlow"
        decode_step()
        model.__dict__["_compiled_call"] = "graphs compiled with the capped launch"
    assert "_compiled_call" not in model.__dict__
    decode_step()
    assert planned == [capped, decode_attention.DEFAULT_ATTEND_LAUNCH]


def test_fp32_logits_rows_allocate_full_width_logits_and_give_the_ops_output():
    """``longflow-compiled-logits-fp32`` rows run the op with its logits scratch in float32 and drop
    the compiled graphs on the way in and out, not the patch; the output is the op's (only the scores
    round otherwise), and later rows allocate fp16 logits again."""
    model = longflow_patch.apply(tiny_model("qwen3", "gqa", layers=2), budget=64, compile=False)
    torch.manual_seed(5)
    inputs = decode_op.make_inputs(1, 40)

    def decode_step() -> tuple[torch.Tensor, torch.dtype]:
        """The op's output on a copy of ``inputs``, and the dtype of the logits scratch it allocated."""
        step = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
        workspaces = {}
        out = decode_attention.decode_attention_triton(**step, **decode_op.SETTINGS, workspaces=workspaces)
        (launches,) = workspaces.values()
        return out, launches.work.logits.dtype

    model.__dict__["_compiled_call"] = "graphs compiled by an earlier row"
    with throughput.generate_variant(model, "longflow-compiled-logits-fp32"):
        assert "_compiled_call" not in model.__dict__
        assert model.__dict__.get("_longflow_policy") is not None, "the row must still decode with LongFlow"
        full_width, dtype = decode_step()
        assert dtype == torch.float32
        model.__dict__["_compiled_call"] = "graphs compiled with float32 logits"
    assert "_compiled_call" not in model.__dict__
    out, dtype = decode_step()
    assert dtype == torch.float16
    torch.testing.assert_close(full_width, out, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["own-lm-head", "tied-embedding"])
def test_the_roofline_counts_each_weight_once_and_only_the_steps_embedding_rows(tied):
    """A step reads the decoder layers' weights, the lm_head and the KV of its slots once each, and
    of the input embedding only its tokens' rows, unless the lm_head is that table (then it is read
    whole, once). The bench's roofline, its full cache's and the profile's parts all count that."""
    hidden, vocab, layers, kv_heads, head_dim = 64, 1000, 2, 2, 16
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                         tie_word_embeddings=tied)  # fmt: skip
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    batch, slots, bandwidth_gbs = 3, 50, 7.0
    decoder = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()

    parts = step_read_bytes(model, batch, slots)

    assert parts == {
        "decoder_weights": 2 * decoder,
        "lm_head": 2 * vocab * hidden,
        "embedding_rows": 0 if tied else 2 * batch * hidden,
        "kv_cache": 2 * batch * slots * layers * 2 * kv_heads * head_dim,
    }
    seconds = throughput.roofline_seconds(model, batch, slots, bandwidth_gbs)
    assert seconds == pytest.approx(sum(parts.values()) / (bandwidth_gbs * 1e9))
    assert sum(profile_step.roofline_parts(model, batch, slots, bandwidth_gbs).values()) == pytest.approx(seconds * 1e3)
    full = throughput.full_cache_roofline(model, prompt=20, output=60, cap=2**40, bandwidth=bandwidth_gbs, most=batch)
    expected = throughput.roofline_seconds(model, full["batch"], 20 + 60 / 2, bandwidth_gbs) * 1e3
    assert full["step_ms"] == pytest.approx(expected)


def test_a_runs_rooflines_recount_without_the_embedding_table_and_keep_the_runs_own():
    """`bench/recount_roofline.py` on an 8B-shape run: each row's roofline loses the embedding table
    but its step's rows, the ratios follow, the run's own figures stay beside, and a second recount
    changes nothing."""
    model = recount_roofline.meta_model("qwen3-8b")
    table = model.model.embed_tokens.weight
    bandwidth, prompt, output = 3000.0, 512, 8192
    everything = sum(p.numel() * p.element_size() for p in model.parameters())

    def counted_then(batch: int, slots: float) -> float:  # every weight's bytes and the KV, in ms
        return (everything + batch * slots * 36 * 2 * 8 * 128 * 2) / (bandwidth * 1e9) * 1e3

    rows = [{"config": "longflow-compiled", "output": output, "batch": 171, "step_ms_mean": 24.0},
            {"config": "fullcache-loop", "output": output, "batch": 38, "step_ms_mean": 16.0},
            {"config": "default", "output": output, "skipped": "time"}]  # fmt: skip
    for row, slots in zip(rows[:2], ((prompt + output) // 5, prompt + output / 2), strict=True):
        row["tokens_per_s"] = row["batch"] / row["step_ms_mean"] * 1e3
        row["roofline_ms"] = counted_then(row["batch"], slots)
        row["vs_roofline"] = row["step_ms_mean"] / row["roofline_ms"]
    full_then = {"batch": 38, "step_ms": counted_then(38, prompt + output / 2)}
    payload = {"shape": "qwen3-8b", "copy_bandwidth_gbs": bandwidth, "prompt": prompt, "rows": rows,
               "full_cache_roofline": {str(output): full_then}}  # fmt: skip

    recounted = recount_roofline.recount(payload)

    assert payload["rows"][0]["roofline_ms"] == rows[0]["roofline_ms"]  # the input is left as it was
    for before, after in zip(rows[:2], recounted["rows"][:2], strict=True):
        table_less_rows = (table.numel() - before["batch"] * table.shape[1]) * 2 / (bandwidth * 1e9) * 1e3
        assert after["roofline_ms"] == pytest.approx(before["roofline_ms"] - table_less_rows)
        assert after["vs_roofline"] == pytest.approx(before["step_ms_mean"] / after["roofline_ms"])
        assert after["roofline_ms" + recount_roofline.EARLIER] == before["roofline_ms"]
    full = recounted["full_cache_roofline"][str(output)]
    assert full["step_ms"] == pytest.approx(recounted["rows"][1]["roofline_ms"])
    assert recounted["rows"][0]["x_full_roofline"] == pytest.approx(rows[0]["tokens_per_s"] / full["tokens_per_s"])
    assert recounted["rows"][2] == rows[2]
    assert recount_roofline.recount(recounted) == recounted


def test_the_floor_is_the_roofline_until_the_matmuls_arithmetic_outlasts_their_reads():
    """`common.step_floor_seconds` on the 8B shape at an H100's rates (3,000 GB/s, 690 TFLOP/s: the
    two meet at batch 230): the roofline below, the weights' arithmetic in place of their read
    above; `add_floor` sets a row's ratio to it."""
    model = recount_roofline.meta_model("qwen3-8b")
    bandwidth, tflops, slots = 3000.0, 690.0, 921
    parts = step_read_bytes(model, 512, slots)
    weights = parts["decoder_weights"] + parts["lm_head"]

    for batch in (64, 229):
        roofline = throughput.roofline_seconds(model, batch, slots, bandwidth)
        assert step_floor_seconds(model, batch, slots, bandwidth, tflops) == pytest.approx(roofline)
    roofline = throughput.roofline_seconds(model, 512, slots, bandwidth)
    arithmetic = 2 * 512 * (weights / 2) / (tflops * 1e12)
    expected = roofline - weights / (bandwidth * 1e9) + arithmetic
    assert step_floor_seconds(model, 512, slots, bandwidth, tflops) == pytest.approx(expected)
    assert expected > roofline * 1.2

    row = {"config": "longflow-compiled", "output": 4096, "batch": 512, "step_ms_mean": 40.0}
    throughput.add_floor(row, model, prompt=512, bandwidth=bandwidth, tflops=tflops)
    assert row["floor_ms"] == pytest.approx(expected * 1e3)  # LongFlow's budget: (512 + 4096) // 5 = 921 slots
    assert row["vs_floor"] == pytest.approx(40.0 / row["floor_ms"])
