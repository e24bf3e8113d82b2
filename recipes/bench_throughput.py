"""End-to-end decode throughput: LongFlow against the strongest full-cache baseline we can build,
transformers' own full-cache paths, and the full cache's roofline.

Random-weight models of real shapes (weights do not change speed), bf16, a 512-token prompt and
outputs of 4k-32k tokens. Configurations, each at the largest batch whose weights plus KV cache
fit under ``--memory-cap-gb`` (rows are labelled in the JSON, `LABELS`):

1. ``fullcache-loop``: the strongest full-cache baseline: a compiled, static-shape decode loop
   (gpt-fast style: one ``torch.compile(fullgraph=True, mode="reduce-overhead")`` step per token,
   greedy token on the device, CUDA graphs) over a full cache at fixed addresses whose attention
   reads only the filled positions, each K/V tile once for all query heads of its KV head (the
   split-K GQA kernel of ``longflow::verify_attention`` with one query: flash decoding);
2. ``longflow-compiled``: LongFlow at 80% compression (budget = 20% of prompt + output) with
   `apply`'s defaults (``compile="auto"``: compiled + CUDA graphs on one GPU), through ``generate``;
3. ``longflow``: the same, eager (``compile=False``);
4. ``longflow-loop``: LongFlow in the same compiled loop as ``fullcache-loop`` (no ``generate``);
   ``longflow-compiled-sync``: ``longflow-compiled`` with ``generate`` reading its stop check on
   the host every step (transformers' rule on CUDA, which `apply` lifts for its own caches);
   ``longflow-compiled-unfused``: ``longflow-compiled`` with the q, k and v projections as three
   matmuls and the MLP's gate and up as two, as transformers runs them (`apply` fuses each set into
   one on a GPU); ``longflow-compiled-gate-up-apart``: only the gate and up apart;
   ``longflow-compiled-prepared-apart``: ``longflow-compiled`` with the new token's q/k norms
   (Qwen3) and RoPE run by transformers' modules, not inside the fused op;
   ``longflow-compiled-capped-registers``: ``longflow-compiled`` with the attention pass in 32-slot
   tiles, 3 stages, at 128 registers a thread: four programs an SM (`CAPPED_ATTEND_LAUNCH`);
   ``longflow-compiled-serial-scoring``: ``longflow-compiled`` with each layer's scoring pass on the
   model's stream (`apply` runs it on a side stream, beside the layer's next kernels:
   `kernels/side_stream.py`); ``longflow-compiled-scoring-low-priority``: that side stream at the
   model stream's priority, not above it; ``longflow-compiled-logits-fp32``: the logits between the
   op's two passes in float32, as until 2026-12-07 (the op keeps them in fp16);
5. ``default``: transformers' default, DynamicCache + SDPA, eager ``generate``;
6. ``static``: transformers' static cache + ``torch.compile`` (CUDA graphs); with an attention
   mask it repeats K/V over each GQA group and reads all ``max_cache_len`` slots every step.

Method. A full 32k-token run of every configuration would take hours of GPU time, so each is
timed over ``--steps`` decode steps at the context lengths that matter, and tokens/s over the
whole output is integrated from those step times: full caches are filled up to the context
(their step time grows linearly with it: measured at the start and the end of the output, and
averaged), LongFlow's step does not depend on the context or the prompt (its cache is
budget-sized from the first step, and the kernel reads every slot), so it is timed after a
``--timing-prompt``-token prompt. Through ``generate``, step time is the difference of two timed
calls of different lengths, so prefill and set-up cancel; the loops time their steps directly.
The roofline of a step is the bytes it must read over the measured copy bandwidth: each weight
matrix once, the input embedding's rows of the step's tokens (not the whole table, which rooflines
here counted until 2026-12-07: 1.2 GB, 0.41 ms of an 8B step on an H100), and the KV cache
(`common.step_read_bytes`); the full cache's roofline is that of a full cache at its own largest
batch, each step reading only the filled positions (``prompt + output / 2`` on average). On a GPU
each row's ``vs_floor`` also counts the matmuls' arithmetic at the bf16 rate measured in the same
process: each matmul at the longer of its read and its arithmetic (`common.step_floor_seconds`).
Compiled configurations are compiled once per process and shape, as a user's would be: the loops
compile with dynamic shapes once, and later outputs only capture CUDA graphs; compiled LongFlow
through ``generate`` compiles each new shape (static shapes, `apply`'s default;
``--compile-shapes dynamic``: the second compiles again with dynamic shapes and later ones only
capture); ``first_call_s`` and ``compile_s`` (first call less a steady call of the same length)
record that cost.

    python recipes/bench_throughput.py --shape qwen3-8b
    python recipes/plot_throughput.py bench/results/throughput_qwen3-8b.json
"""

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
import torch
from torch._dynamo.utils import counters
from tqdm import tqdm
from transformers import CompileConfig, DynamicCache, StaticCache, StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import longflow_patch
from longflow_patch import attention, compat, fused_projections
from longflow_patch.compat import cache_keyword
from longflow_patch.kernels import decode_attention, side_stream
from longflow_patch.kernels.decode_attention import AttendLaunch
from longflow_patch.progress import TokenProgress
from longflow_patch.speculative_cache import SpeculativeCache

from common import (
    SHAPES,
    build_model,
    copy_bandwidth_gbs,
    environment,
    kv_bytes_per_token,
    matmul_tflops,
    print_table,
    step_floor_seconds,
    step_read_bytes,
    synchronize,
    write_results,
)

CONFIGS = (
    "fullcache-loop",
    "longflow-compiled",
    "longflow",
    "longflow-loop",
    "longflow-compiled-sync",
    "longflow-compiled-unfused",
    "longflow-compiled-gate-up-apart",
    "longflow-compiled-prepared-apart",
    "longflow-compiled-capped-registers",
    "longflow-compiled-serial-scoring",
    "longflow-compiled-scoring-low-priority",
    "longflow-compiled-logits-fp32",
    "default",
    "static",
)
OPT_IN = (
    "longflow-loop",
    "longflow-compiled-sync",
    "longflow-compiled-unfused",
    "longflow-compiled-gate-up-apart",
    "longflow-compiled-prepared-apart",
    "longflow-compiled-capped-registers",
    "longflow-compiled-serial-scoring",
    "longflow-compiled-scoring-low-priority",
    "longflow-compiled-logits-fp32",
)
"""Configurations run only when named in ``--configs``."""
LABELS = {
    "fullcache-loop": "strongest full cache: compiled static-shape loop, CUDA graphs, split-K GQA kernel "
    "reading only the filled positions",
    "longflow-compiled": "LongFlow 80% compression, apply's default (compile='auto': compiled + CUDA graphs), generate",
    "longflow": "LongFlow 80% compression, eager (compile=False), generate",
    "longflow-loop": "LongFlow 80% compression in the same compiled loop as fullcache-loop",
    "longflow-compiled-sync": "longflow-compiled with generate's stop check read on the host every step "
    "(transformers' rule on CUDA)",
    "longflow-compiled-unfused": "longflow-compiled with q, k, v projected by three matmuls and gate, up by two "
    "(transformers' way), not apply's one each",
    "longflow-compiled-gate-up-apart": "longflow-compiled with the MLP's gate and up projected by two matmuls "
    "(transformers' way), not apply's one (q, k, v still one)",
    "longflow-compiled-prepared-apart": "longflow-compiled with the new token's q/k norms and RoPE run by "
    "transformers' modules, not inside the fused op",
    "longflow-compiled-capped-registers": "longflow-compiled with the attention pass in 32-slot tiles, 3 stages, "
    "at 128 registers a thread (four programs an SM)",
    "longflow-compiled-serial-scoring": "longflow-compiled with each layer's scoring pass on the model's stream, "
    "between its attention pass and o_proj (apply runs it beside the next kernels)",
    "longflow-compiled-scoring-low-priority": "longflow-compiled with the scoring pass's side stream at the model "
    "stream's priority (apply's is higher)",
    "longflow-compiled-logits-fp32": "longflow-compiled with the logits between the op's two passes in float32, "
    "twice apply's bytes (timed only: scores not rounded as the reference's may choose other slots)",
    "default": "transformers default: DynamicCache + SDPA, eager generate",
    "static": "transformers static cache + torch.compile (CUDA graphs; repeats K/V per GQA group, reads all slots)",
}
THROUGH_GENERATE = (
    "longflow-compiled",
    "longflow-compiled-sync",
    "longflow-compiled-unfused",
    "longflow-compiled-gate-up-apart",
    "longflow-compiled-prepared-apart",
    "longflow-compiled-capped-registers",
    "longflow-compiled-serial-scoring",
    "longflow-compiled-scoring-low-priority",
    "longflow-compiled-logits-fp32",
)
"""Compiled LongFlow through ``generate`` (apply's ``compile="auto"``)."""
CAPPED_ATTEND_LAUNCH = AttendLaunch(block_s=32, num_warps=4, num_stages=3, max_registers=128)
"""An attention-pass launch that fits four programs an SM (128 registers, 39 KB of shared memory for
head_dim 128, no spills for sm_90: `bench/kernel_ptx.py`); the default fits two. The best of
`bench/decode_op.py --sweep --sweep-capped` at the 8B 4k rows on an H100."""
# Timed calls of each length per row, after the first (which compiles): the median is kept. (One
# call each let a single slow call decide a row: the H100's fifth run has a row whose short call
# took 13 s longer than its long one.)
TIMED_REPEATS = 3
COMPRESSED = (*THROUGH_GENERATE, "longflow", "longflow-loop")
LOOPS = ("fullcache-loop", "longflow-loop")
COMPILED = ("fullcache-loop", *THROUGH_GENERATE, "longflow-loop", "static")
COLUMNS = ["config", "output", "batch", "budget", "step_ms_first", "step_ms_last", "tokens_per_s", "x_strongest",
           "x_full_roofline", "x_default", "x_static", "vs_roofline", "vs_floor", "compile_s", "cudagraph_skips",
           "peak_gib"]  # fmt: skip


def weight_bytes(model) -> int:
    """Bytes the weights occupy (a shared weight once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


ROOFLINE_ACCOUNTING = "step_read_bytes"
"""How the results' rooflines count a step's bytes (`common.step_read_bytes`); results written
before 2026-12-07 counted the whole embedding table (`bench/recount_roofline.py` recounts them)."""


def roofline_seconds(model, batch: int, slots: float, bandwidth: float) -> float:
    """A step that only read what it must (`step_read_bytes`) at ``bandwidth`` GB/s."""
    return sum(step_read_bytes(model, batch, slots).values()) / (bandwidth * 1e9)


def longflow_budget(prompt: int, output: int) -> int:
    """LongFlow's budget in every row: 80% compression, a fifth of the prompt and output."""
    return (prompt + output) // 5


def slots_read(kind: str, prompt: int, output: int) -> float:
    """Cached positions a step of ``kind`` reads per sequence and layer, on average over an output of
    ``output`` tokens: LongFlow's budget, the static cache's every slot, another full cache's filled
    positions."""
    if kind in COMPRESSED:
        return longflow_budget(prompt, output)
    return prompt + output if kind == "static" else prompt + output / 2


def add_floor(row: dict, model, prompt: int, bandwidth: float, tflops: float) -> None:
    """A measured row's step over its floor with the matmuls' arithmetic counted
    (`common.step_floor_seconds`, at ``tflops``, the bf16 rate measured in the same process):
    ``vs_floor``, the part of ``vs_roofline`` that no faster kernel can remove."""
    slots = slots_read(row["config"], prompt, row["output"])
    floor = step_floor_seconds(model, row["batch"], slots, bandwidth, tflops)
    row.update(matmul_tflops=tflops, floor_ms=floor * 1e3, vs_floor=row["step_ms_mean"] * 1e-3 / floor)


def largest_batch(model, slots_per_sequence: int, cap_bytes: float, most: int) -> int:
    """Largest batch whose weights + KV cache + working memory (logits, activations) fit the cap."""
    config = model.config
    per_sequence = slots_per_sequence * kv_bytes_per_token(config)
    per_sequence += 512 * (config.intermediate_size * 2 * 2 + config.hidden_size * 8) + config.vocab_size * 8
    return max(1, min(most, int((cap_bytes - weight_bytes(model) - 2 * 2**30) // per_sequence)))


def filled_cache(model, kind: str, batch: int, context: int, max_len: int):
    """A transformers full cache holding ``context`` random tokens per sequence."""
    config = model.config
    cache = DynamicCache(config=config) if kind == "default" else StaticCache(config=config, max_cache_len=max_len)
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(shape, dtype=model.dtype, device=model.device)
        cache.update(keys, torch.randn_like(keys), layer)
    return cache


def full_cache(model, batch: int, capacity: int) -> SpeculativeCache:
    """The baseline's full cache: ``capacity`` slots per sequence and layer at fixed addresses, a
    device-side length (set by the caller); zeros stand for tokens (speed does not depend on them)."""
    config = model.config
    cache = SpeculativeCache(config.num_hidden_layers, capacity)
    token = torch.zeros(batch, config.num_key_value_heads, 1, config.head_dim, dtype=model.dtype, device=model.device)
    for layer in cache.layers:
        layer.lazy_initialization(token, token)
        layer.prefilled = True
    return cache


def timed_generate(model, batch: int, context: int, new_tokens: int, cache=None) -> float:
    ids = torch.randint(3, model.config.vocab_size, (batch, context + 1), device=model.device)
    synchronize()
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_keyword(model): cache},
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
    synchronize()
    return time.perf_counter() - start


def generate_step_seconds(model, kind: str, batch: int, context: int, max_len: int, steps: int) -> tuple[float, dict]:
    """Seconds per decode step of the real ``generate`` loop at ``context`` tokens, and the first
    call's cost (compilation and CUDA-graph capture happen there): ``first_call_s`` and
    ``compile_s``, the first call less a steady call of the same length. The step is the median
    long call less the median short one, over `TIMED_REPEATS` of each, taken in turns."""
    static = filled_cache(model, "static", batch, context, max_len) if kind == "static" else None

    def run(new_tokens: int) -> float:
        if kind == "default":
            cache = filled_cache(model, "default", batch, context, max_len)
            return timed_generate(model, batch, context, new_tokens, cache)
        if static is not None:
            for layer in static.layers:
                layer.cumulative_length.fill_(context)
        return timed_generate(model, batch, context, new_tokens, static)

    first = run(steps)
    shorts, longs = zip(*((run(steps // 4), run(steps)) for _ in range(TIMED_REPEATS)), strict=True)
    short, long = statistics.median(shorts), statistics.median(longs)
    return (long - short) / (steps - steps // 4), {"first_call_s": first, "compile_s": first - long}


def _greedy_step(model, keyword: str, cache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One decode step: the next greedy token ``[B, 1]`` of ``token`` ``[B, 1]`` at ``position``."""
    logits = model(input_ids=token, position_ids=position, use_cache=True, **{keyword: cache}).logits
    return logits[:, -1].argmax(dim=-1, keepdim=True)


def compiled_greedy_step(name: str, backend: str | Callable = "inductor") -> Callable:
    """`_greedy_step` compiled whole (``fullgraph``, CUDA graphs on a GPU), under a code object of
    its own: dynamo keeps compiled graphs per code object, so each loop's shapes stay its own."""
    code = _greedy_step.__code__.replace(co_name=f"greedy_step_{name.replace('-', '_')}")
    function = types.FunctionType(code, _greedy_step.__globals__, code.co_name)
    mode = "reduce-overhead" if backend == "inductor" and torch.cuda.is_available() else None
    return torch.compile(function, fullgraph=True, mode=mode, backend=backend)


def mark_batch_and_slots_dynamic(cache) -> None:
    """Let the loop's first compile cover every batch size and cache length: the batch and slot
    dimensions of the cache's buffers become dynamic (where nothing specialises them; the step's
    inputs get their batch dimension marked at each call), so later output lengths capture CUDA
    graphs without recompiling."""
    for layer in cache.layers:
        for tensor in vars(layer).values():
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
                if tensor.dim() >= 3:
                    torch._dynamo.maybe_mark_dynamic(tensor, 2)


def loop_step_seconds(model, step: Callable, cache, batch: int, context: int, steps: int,
                      set_context: Callable[[], None]) -> tuple[float, dict]:  # fmt: skip
    """Seconds per step of a compiled decode loop (the median of `TIMED_REPEATS` runs), and its
    first three steps' cost (compilation and capture): ``first_call_s`` and ``compile_s``, those
    steps less three steady ones. ``set_context`` puts the cache back at ``context`` tokens before
    each run."""
    keyword = cache_keyword(model)
    token = torch.randint(3, model.config.vocab_size, (batch, 1), device=model.device)

    @torch.no_grad()
    def run(count: int) -> float:
        set_context()
        current, position = token, torch.full((batch, 1), context, device=model.device)
        mark_batch_and_slots_dynamic(cache)
        synchronize()
        start = time.perf_counter()
        for _ in range(count):
            for tensor in (current, position):  # the same marks on every call's inputs
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
            torch.compiler.cudagraph_mark_step_begin()
            current = step(model, keyword, cache, current, position).clone()  # graph outputs are reused
            position = position + 1
        synchronize()
        return time.perf_counter() - start

    first = run(3)
    seconds = statistics.median(run(steps) for _ in range(TIMED_REPEATS)) / steps
    return seconds, {"first_call_s": first, "compile_s": first - 3 * seconds}


def generate_compile_config(kind: str, compile_shapes: str) -> CompileConfig | None:
    """The model's ``compile_config`` for a row: None (`apply`'s settings for compiled LongFlow,
    static shapes; transformers' defaults for its static cache), or for ``longflow-compiled`` with
    ``compile_shapes="dynamic"`` the settings `apply` used before it kept shapes static:
    transformers' defaults with ``fullgraph`` (dynamic shapes from the second shape on)."""
    if kind in THROUGH_GENERATE and compile_shapes == "dynamic":
        return CompileConfig(fullgraph=True, mode="reduce-overhead")
    return None


@contextlib.contextmanager
def per_step_stop_check() -> Iterator[None]:
    """``generate`` reads its stop check on the host every step, as transformers does on CUDA,
    not one step late (`longflow_patch.compat.defer_stop_check_on_cuda`)."""
    deferring = compat.DEFERRED_STOP_DEVICES
    compat.DEFERRED_STOP_DEVICES = ()
    try:
        yield
    finally:
        compat.DEFERRED_STOP_DEVICES = deferring


@contextlib.contextmanager
def projections_apart(model, apart: tuple[tuple[str, ...], ...]) -> Iterator[None]:
    """The projections ``apart`` (`fused_projections.QKV`, `fused_projections.GATE_UP`) of ``model``
    run as separate matmuls, as in transformers (`apply` fuses each set into one on a GPU:
    `longflow_patch.fused_projections`)."""
    fusing = dict(fused_projections.FUSE_ON_DEVICES)
    for names in apart:
        fused_projections.FUSE_ON_DEVICES[names] = ()
    for module in model.modules():
        fused = fused_projections.fused_projection(module)
        if fused is not None and fused.names in apart:
            fused_projections.unfuse(module)
    try:
        yield
    finally:
        fused_projections.FUSE_ON_DEVICES.update(fusing)


@contextlib.contextmanager
def preparation_apart() -> Iterator[None]:
    """Decode steps hand the op their new query and key normalised and rotated by transformers'
    modules (the op does both itself on a GPU: `longflow_patch.attention.new_token_preparation`)."""
    devices = attention.PREPARE_IN_OP_ON_DEVICES
    attention.PREPARE_IN_OP_ON_DEVICES = ()
    try:
        yield
    finally:
        attention.PREPARE_IN_OP_ON_DEVICES = devices


@contextlib.contextmanager
def op_setting(model, module: types.ModuleType, name: str, value: object) -> Iterator[None]:
    """Decode steps run with ``module.name`` set to ``value``: the attention pass's launch
    (`decode_attention.DEFAULT_ATTEND_LAUNCH`), where the scoring pass runs (`side_stream`), or the
    dtype of the op's logits scratch (`decode_attention.STORED_LOGIT_DTYPE`). The op reads these when
    it runs, inside graphs that dynamo does not guard on them, so compiled graphs are dropped on the
    way in and out (the patch stays)."""
    default = getattr(module, name)
    drop_compiled_graphs(model)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, default)
        drop_compiled_graphs(model)


def generate_variant(model, kind: str) -> contextlib.AbstractContextManager:
    """What a row through ``generate`` changes around its calls (nothing for ``longflow-compiled``)."""
    if kind == "longflow-compiled-sync":
        return per_step_stop_check()
    if kind == "longflow-compiled-unfused":
        return projections_apart(model, (fused_projections.QKV, fused_projections.GATE_UP))
    if kind == "longflow-compiled-gate-up-apart":
        return projections_apart(model, (fused_projections.GATE_UP,))
    if kind == "longflow-compiled-prepared-apart":
        return preparation_apart()
    if kind == "longflow-compiled-capped-registers":
        return op_setting(model, decode_attention, "DEFAULT_ATTEND_LAUNCH", CAPPED_ATTEND_LAUNCH)
    if kind == "longflow-compiled-serial-scoring":
        return op_setting(model, side_stream, "OVERLAP_SCORING", False)
    if kind == "longflow-compiled-scoring-low-priority":
        return op_setting(model, side_stream, "SIDE_STREAM_PRIORITY", 0)
    if kind == "longflow-compiled-logits-fp32":
        return op_setting(model, decode_attention, "STORED_LOGIT_DTYPE", torch.float32)
    return contextlib.nullcontext()


@torch.no_grad()
def measure(model, kind: str, prompt: int, output: int, batch: int, steps: int, bandwidth: float,
            timing_prompt: int, loop_steps: dict, backend: str, compile_shapes: str = "static") -> dict:  # fmt: skip
    """One row: step times, tokens/s, roofline and first-call cost of ``kind`` at ``batch``
    (``compile_shapes``: `generate_compile_config`)."""
    config = model.config
    total = prompt + output
    budget = longflow_budget(prompt, output)
    compressed = kind in COMPRESSED
    model.generation_config.compile_config = generate_compile_config(kind, compile_shapes)
    if compressed:
        compile = "auto" if kind in THROUGH_GENERATE else False
        longflow_patch.apply(model, policy="longflow", budget=budget, compile=compile)
    elif kind == "fullcache-loop":
        longflow_patch.apply(model, compile=False)  # installs the attention that serves a SpeculativeCache
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cudagraph_skips = counters["inductor"]["cudagraph_skips"]
    first_call: dict = {}
    if kind in LOOPS:
        step = loop_steps.setdefault(kind, compiled_greedy_step(kind, backend))
        if kind == "fullcache-loop":
            cache = full_cache(model, batch, total)
            contexts = (prompt, total - steps)
        else:
            cache = longflow_patch.new_cache(model)
            ids = torch.randint(3, config.vocab_size, (batch, timing_prompt), device=model.device)
            model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})  # prefill, eager
            contexts = (timing_prompt,)
        times = []
        for context in contexts:

            def set_context(context=context):
                if kind == "fullcache-loop":
                    for layer in cache.layers:
                        layer.length.fill_(context)

            seconds, cost = loop_step_seconds(model, step, cache, batch, context, steps, set_context)
            times.append(seconds)
            first_call = first_call or cost
        first, last = times[0], times[-1]
        del cache
    elif compressed:
        with generate_variant(model, kind):
            first, first_call = generate_step_seconds(model, kind, batch, timing_prompt, total, steps)
        last = first
    elif kind == "static":
        first, first_call = generate_step_seconds(model, kind, batch, prompt + output // 2, total, steps)
        last = first  # reads all max_cache_len slots whatever the context
    else:
        first, _ = generate_step_seconds(model, kind, batch, prompt, total, steps)
        last, _ = generate_step_seconds(model, kind, batch, total - steps, total, steps)
    mean_step = (first + last) / 2
    roofline = roofline_seconds(model, batch, slots_read(kind, prompt, output), bandwidth)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    row = {
        "config": kind, "label": LABELS[kind], "output": output, "batch": batch,
        "budget": budget if compressed else None,
        "step_ms_first": first * 1e3, "step_ms_last": last * 1e3, "step_ms_mean": mean_step * 1e3,
        "tokens_per_s": batch / mean_step, "peak_gib": peak, "roofline_ms": roofline * 1e3,
        "vs_roofline": mean_step / roofline,
    }  # fmt: skip
    if kind in THROUGH_GENERATE:
        row["compile_shapes"] = compile_shapes
    if kind in COMPILED:
        # Graphs inductor compiled here but would not replay from CUDA graphs (each such step
        # launches every kernel from the host): 0 unless something blocks capture.
        row.update(first_call, cudagraph_skips=counters["inductor"]["cudagraph_skips"] - cudagraph_skips)
    return row


def release(model) -> None:
    """Free one configuration's caches between rows; compiled graphs stay, as in a user's process
    (`reset_compiled` drops them)."""
    longflow_patch.unapply(model)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def drop_compiled_graphs(model) -> None:
    """Drop ``model``'s compiled graphs and CUDA-graph pools; the patch stays."""
    model.__dict__.pop("_compiled_call", None)
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_compiled(model) -> None:
    """Free the configuration and drop compiled graphs (between a run's parts, not between rows)."""
    release(model)
    drop_compiled_graphs(model)


def measure_largest(model, kind: str, prompt: int, output: int, cap: float, steps: int, bandwidth: float,
                    timing_prompt: int, loop_steps: dict, backend: str, most: int = 256,
                    compile_shapes: str = "static") -> dict:  # fmt: skip
    """`measure` at the estimated largest batch, stepping the batch down by 20% on out-of-memory."""
    slots = longflow_budget(prompt, output) if kind in COMPRESSED else prompt + output
    batch = largest_batch(model, slots, cap, most)
    while True:
        try:
            return measure(model, kind, prompt, output, batch, steps, bandwidth, timing_prompt, loop_steps, backend,
                           compile_shapes)  # fmt: skip
        except torch.OutOfMemoryError:
            release(model)
            if batch == 1:
                raise
            batch = max(1, int(batch * 0.8))
            tqdm.write(f"{kind}: out of memory, retrying at batch {batch}")
        finally:
            release(model)


def full_cache_roofline(model, prompt: int, output: int, cap: float, bandwidth: float, most: int = 256) -> dict:
    """tokens/s of a full cache at its largest batch under ``cap`` if every step ran at the copy
    bandwidth, reading the weights and only the filled positions (``prompt + output / 2`` on average)."""
    return full_cache_at_roofline(model, largest_batch(model, prompt + output, cap, most), prompt, output, bandwidth)


def full_cache_at_roofline(model, batch: int, prompt: int, output: int, bandwidth: float) -> dict:
    """`full_cache_roofline` at a given ``batch``."""
    step = roofline_seconds(model, batch, slots_read("fullcache-loop", prompt, output), bandwidth)
    return {"batch": batch, "step_ms": step * 1e3, "tokens_per_s": batch / step}


def add_ratios(rows: list[dict], full_rooflines: dict) -> None:
    """Each row's tokens/s over the strongest full-cache baseline's, the full cache's roofline,
    the default's and the static cache's at the same output length (when measured)."""
    for row in rows:
        if "tokens_per_s" not in row:
            continue
        same = {r["config"]: r for r in rows if r["output"] == row["output"] and "tokens_per_s" in r}
        for base, name in (("fullcache-loop", "x_strongest"), ("default", "x_default"), ("static", "x_static")):
            if base in same:
                row[name] = row["tokens_per_s"] / same[base]["tokens_per_s"]
        if row["output"] in full_rooflines:
            row["x_full_roofline"] = row["tokens_per_s"] / full_rooflines[row["output"]]["tokens_per_s"]


def memory_trace(model, batch: int, budget: int, prompt: int, output: int, every: int) -> list[dict]:
    """GPU memory in use while one compiled LongFlow ``generate`` writes ``output`` tokens at a fixed
    budget, sampled every ``every`` tokens, beside the memory of a full cache filled to the same
    length (a DynamicCache holding the same tokens, measured the same way)."""
    samples: list[dict] = []

    class Sampler(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            generated = input_ids.shape[1] - prompt
            if generated % every == 0:
                samples.append({"tokens": prompt + generated, "longflow_gib": torch.cuda.memory_allocated() / 2**30})
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    reset_compiled(model)
    base = torch.cuda.memory_allocated()
    longflow_patch.apply(model, policy="longflow", budget=budget, compile=True)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=model.device)
    with tqdm(total=batch * output, desc="memory trace", unit="tok", unit_scale=True) as bar:
        watchers = StoppingCriteriaList([Sampler(), TokenProgress(bar)])
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=output, min_new_tokens=output,
                       do_sample=False, stopping_criteria=watchers)  # fmt: skip
    reset_compiled(model)
    for sample in samples:
        cache = filled_cache(model, "default", batch, sample["tokens"], sample["tokens"])
        sample["full_cache_gib"] = torch.cuda.memory_allocated() / 2**30
        sample["longflow_gib"] -= base / 2**30
        sample["full_cache_gib"] -= base / 2**30
        del cache
        torch.cuda.empty_cache()
    return samples


# Rows are measured in passes, most needed first, so that a run cut short by its time budget loses
# the least: the strongest baseline and compiled LongFlow, then eager LongFlow, then transformers'
# paths (static last: its compile settings differ from the others').
PASSES = (
    (
        "fullcache-loop",
        "longflow-compiled",
        "longflow-compiled-unfused",
        "longflow-compiled-gate-up-apart",
        "longflow-compiled-prepared-apart",
        "longflow-compiled-capped-registers",
        "longflow-compiled-serial-scoring",
        "longflow-compiled-scoring-low-priority",
        "longflow-compiled-logits-fp32",
        "longflow-compiled-sync",
        "longflow-loop",
    ),
    ("longflow",),
    ("default",),
    ("static",),
)


def estimated_seconds(kind: str, shapes_before: int, compile_shapes: str = "static") -> float:
    """A row's rough cost on an H200 at the 8B shape: a compiled configuration's first shape
    compiles; the loops compile with dynamic shapes from the first, so later shapes only capture
    CUDA graphs; through generate, every shape compiles (static shapes) or the second compiles
    again with dynamic shapes and later ones only capture (``compile_shapes="dynamic"``);
    ``longflow-compiled-sync`` replays the graphs ``longflow-compiled`` compiled just before it."""
    if kind not in COMPILED:
        return 30  # transformers' default: two contexts, seven generate calls each
    if kind == "longflow-compiled-sync":
        return 40
    if kind in LOOPS:
        return 150 if shapes_before == 0 else 30
    if kind in THROUGH_GENERATE and compile_shapes == "static":
        return 150 if shapes_before == 0 else 90
    return (150, 120, 30)[min(shapes_before, 2)]


def run_rows(model, args, bandwidth: float, write: Callable[[list[dict], dict], None], deadline: float = float("inf"),
             after_row: Callable[[dict], None] | None = None) -> tuple[list[dict], dict]:  # fmt: skip
    """Measure every (output, config) of ``args``: configurations in `PASSES`, outputs in the
    order given within each; calls ``write(rows, rooflines)`` after each row and ``after_row(row)``
    (e.g. to profile while a row's graphs are warm). A row whose estimated cost would pass
    ``deadline`` (``time.time()``) is skipped and recorded so (``write`` follows every row, measured,
    skipped or failed)."""
    cap = args.memory_cap_gb * 1e9
    tflops = matmul_tflops() if torch.cuda.is_available() else None
    full_rooflines = {out: full_cache_roofline(model, args.prompt, out, cap, bandwidth, args.max_batch)
                      for out in args.outputs}  # fmt: skip
    order = [(output, kind) for kinds in PASSES for output in args.outputs for kind in kinds if kind in args.configs]
    rows, loop_steps, seen, failed = [], {}, {}, set()
    for output, kind in tqdm(order, desc="rows"):
        shapes_before = seen.get(kind, 0)
        estimate = estimated_seconds(kind, shapes_before, args.compile_shapes)
        if kind in failed or time.time() + estimate > deadline:
            reason = "failed at an earlier output" if kind in failed else f"time: about {estimate} s needed"
            rows.append({"config": kind, "output": output, "skipped": reason})
            tqdm.write(f"{kind:>18} out={output:>6} skipped ({reason})")
            write(rows, full_rooflines)
            continue
        if kind == "static" and shapes_before == 0:
            reset_compiled(model)  # transformers' own compile settings from here
        try:
            row = measure_largest(model, kind, args.prompt, output, cap, args.steps, bandwidth, args.timing_prompt,
                                  loop_steps, args.backend, args.max_batch, args.compile_shapes)  # fmt: skip
        except Exception as error:  # one configuration failing must not lose the others' rows
            rows.append({"config": kind, "output": output, "error": f"{type(error).__name__}: {error}"[:500]})
            tqdm.write(f"{kind:>18} out={output:>6} failed: {type(error).__name__}: {error}")
            failed.add(kind)
            release(model)
            write(rows, full_rooflines)
            continue
        seen[kind] = shapes_before + 1
        if tflops is not None:
            add_floor(row, model, args.prompt, bandwidth, tflops)
        rows.append(row)
        tqdm.write(f"{kind:>18} out={output:>6} batch={row['batch']:>3} {row['tokens_per_s']:9.1f} tok/s")
        add_ratios(rows, full_rooflines)
        write(rows, full_rooflines)
        if after_row is not None:
            after_row(row)
    return rows, full_rooflines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a throughput run (shared with ``bench/speed_suite.py``)."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--timing-prompt", type=int, default=16,
                        help="prompt tokens when timing LongFlow (its step does not depend on them)")  # fmt: skip
    parser.add_argument("--outputs", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=[c for c in CONFIGS if c not in OPT_IN])
    parser.add_argument("--memory-cap-gb", type=float, default=70.0)
    parser.add_argument("--max-batch", type=int, default=256, help="largest batch tried")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per timed call")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the loops (smoke: eager)")
    parser.add_argument("--compile-shapes", choices=["static", "dynamic"], default="static",
                        help="compiled LongFlow through generate: apply's static shapes per shape, or the dynamic "
                             "shapes apply used before (transformers' defaults)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument(
        "--memory-trace",
        type=int,
        nargs=2,
        metavar=("BATCH", "BUDGET"),
        default=None,
        help="also trace memory during one long compiled LongFlow generation at a fixed budget",
    )
    parser.add_argument("--trace-output", type=int, default=None,
                        help="tokens the memory trace generates (default: the longest output)")  # fmt: skip
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/throughput_<shape>.json)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth_gbs() if device == "cuda" else 50.0
    model = build_model(args.shape, device)
    out = Path(args.out or f"bench/results/throughput_{args.shape}.json")
    earlier = json.loads(out.read_text()) if out.exists() else {}
    keep = {key: earlier[key] for key in ("memory_trace", "memory_trace_settings") if key in earlier}
    settings = {"benchmark": "throughput", "environment": environment(), "shape": args.shape,
                "model": SHAPES[args.shape], "prompt": args.prompt, "timing_prompt": args.timing_prompt,
                "memory_cap_gb": args.memory_cap_gb, "steps": args.steps, "compile_shapes": args.compile_shapes,
                "copy_bandwidth_gbs": bandwidth, "roofline_accounting": ROOFLINE_ACCOUNTING,
                "labels": LABELS}  # fmt: skip

    def write(rows: list[dict], rooflines: dict) -> None:
        write_results(out, {**keep, **settings, "full_cache_roofline": rooflines, "rows": rows})

    rows, rooflines = run_rows(model, args, bandwidth, write)
    if args.memory_trace and device == "cuda":
        batch, budget = args.memory_trace
        length = args.trace_output or max(args.outputs)
        trace = memory_trace(model, batch, budget, args.prompt, length, every=length // 16)
        print_table(trace, ["tokens", "longflow_gib", "full_cache_gib"])
        keep.update(memory_trace=trace, memory_trace_settings=[*args.memory_trace, length])
    print()
    print_table([row for row in rows if "tokens_per_s" in row], COLUMNS)
    write(rows, rooflines)


if __name__ == "__main__":
    main()
