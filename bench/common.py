"""Shared by the benchmarks: CUDA-event medians, graph replay, environment record, and
random-weight models of real shapes (weights do not change speed)."""

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from longflow_patch.kernels import launch as kernel_launch

SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=True),
}  # fmt: skip


def parse_args_on_gpu(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` for a GPU-only benchmark: its ``--help`` says "GPU only", and on a machine
    without a CUDA device it exits with one line (status 2) instead of a CUDA assertion mid-run."""
    parser.description = f"GPU only: needs a CUDA device.\n\n{parser.description or ''}"
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, f"{parser.prog}: GPU only: no CUDA device here (this benchmark times CUDA kernels)\n")
    return args


def build_model(shape: str, device: str) -> Qwen3ForCausalLM:
    """A random-weight Qwen3 of one of ``SHAPES`` (bf16 on a GPU, float32 on the CPU), SDPA prompt
    attention, no end-of-sequence token (so ``generate`` always runs its full length)."""
    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=40960, rope_theta=1e6)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def environment() -> dict:
    """Device name and library versions, recorded in every results file."""
    import transformers
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "longflow_direct_launch": kernel_launch.DIRECT_LAUNCH,
    }


def synchronize() -> None:
    """Wait for the GPU (nothing to wait for on a CPU-only machine)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 30) -> float:
    """Median time of one ``fn`` call in ms: from CUDA events around each call on a GPU (host
    launch time included while the GPU waits for it), from the wall clock on a CPU-only machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_ms_per_call(fn: Callable[[], object], calls: int = 50, repeats: int = 7) -> float:
    """Wall-clock time per call of ``calls`` back-to-back calls then one synchronisation, in ms
    (median over ``repeats``): what a host-bound loop of such calls pays per call."""
    for _ in range(3):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def interleaved_call_us(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """``{name}_event_us`` (`median_ms`) and ``{name}_wall_us`` (`wall_ms_per_call`) of each call in
    µs: medians over ``rounds`` rounds in which the calls take turns, so that a drift of the host's
    speed reaches them all alike."""
    times = {f"{name}_{clock}_us": [] for name in calls for clock in ("event", "wall")}
    for _ in range(rounds):
        for name, call in calls.items():
            times[f"{name}_event_us"].append(median_ms(call) * 1e3)
            times[f"{name}_wall_us"].append(wall_ms_per_call(call) * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}


def graph_median_ms(fn: Callable[[], object], calls_per_graph: int = 20, repeats: int = 15) -> float:
    """Median GPU time of one ``fn`` call, captured ``calls_per_graph`` times in a CUDA graph
    and replayed: launch overhead is gone, so this is the device time a decode loop under CUDA
    graphs pays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    return median_ms(graph.replay, warmup=3, repeats=repeats) / calls_per_graph


def copy_bandwidth_gbs(gigabytes: float = 2.0, rounds: int = 3) -> float:
    """Measured device-to-device copy rate in GB/s, counting bytes read plus bytes written: the best
    of ``rounds`` rounds, each with fresh buffers, a warm-up of at least half a second and the
    median of 20 copies. One round of ten copies varied by 4% between processes on one H100 while
    the decode steps timed beside it did not (fourteenth run, `docs/results/kernels_throughput.md`);
    the roofline wants the rate the device reaches, so the best round is kept."""
    best = 0.0
    for _ in range(rounds):
        source = torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device="cuda")
        target = torch.empty_like(source)
        copy = functools.partial(target.copy_, source)
        warm_until = time.perf_counter() + 0.5
        while time.perf_counter() < warm_until:
            copy()
            synchronize()
        ms = median_ms(copy, warmup=0, repeats=20)
        best = max(best, 2 * source.numel() / (ms * 1e-3) / 1e9)
        del source, target, copy  # the next round allocates its own: 4 GiB at a time, not 8
    return best


def matmul_tflops(size: int = 8192) -> float:
    """The bf16 rate in TFLOP/s of cuBLAS's ``size``-cubed matmul (median under a CUDA graph): the
    rate a matmul with enough work to fill the GPU reaches, the compute floor's denominator."""
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = graph_median_ms(lambda: a @ b, calls_per_graph=5, repeats=10)
    return 2 * size**3 / (ms * 1e9)


def kv_bytes_per_token(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one token's keys and values over all layers."""
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize


def step_read_bytes(model: torch.nn.Module, batch: int, slots: float) -> dict[str, float]:
    """The bytes one decode step of ``model`` must read, by part, for ``batch`` sequences with
    ``slots`` cached positions each: the decoder layers' weights, the lm_head's, the input
    embedding's rows of the step's tokens (``batch`` rows, not the table; none apart when the
    lm_head shares the table, which it reads whole), and the KV cache (model dtype). What a
    roofline counts: a step that read only these, once, at the copy bandwidth."""
    lm_head = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings().weight
    everything = sum(p.numel() * p.element_size() for p in model.parameters())  # a shared weight once
    head = lm_head.numel() * lm_head.element_size()
    layers = everything - head
    rows = 0
    if embedding is not lm_head:
        layers -= embedding.numel() * embedding.element_size()
        rows = batch * embedding.shape[1] * embedding.element_size()
    kv = batch * slots * kv_bytes_per_token(model.config, model.dtype)
    return {"decoder_weights": layers, "lm_head": head, "embedding_rows": rows, "kv_cache": kv}


def step_floor_seconds(model: torch.nn.Module, batch: int, slots: float, bandwidth_gbs: float,
                       tflops: float) -> float:  # fmt: skip
    """A step's floor once its matmuls' arithmetic counts too: every weight matrix takes the longer of
    its read at ``bandwidth_gbs`` and its ``2 x batch`` operations a weight at ``tflops`` (all of a
    decode step's matmuls do ``batch`` multiply-adds per weight read, so one of the two bounds them
    all: for bf16 weights the read below a batch of ``tflops / bandwidth``, TFLOP/s over TB/s,
    about 230 on an H100); the embedding rows and the KV cache at ``bandwidth_gbs``. The roofline's
    (`step_read_bytes`) where the reads are the larger, above it where the arithmetic is."""
    parts = step_read_bytes(model, batch, slots)
    weights = parts["decoder_weights"] + parts["lm_head"]
    read = weights / (bandwidth_gbs * 1e9)
    arithmetic = 2 * batch * (weights / model.dtype.itemsize) / (tflops * 1e12)
    return max(read, arithmetic) + (parts["embedding_rows"] + parts["kv_cache"]) / (bandwidth_gbs * 1e9)


def write_results(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).rjust(widths[c]) for c in columns))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
