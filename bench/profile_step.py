"""Where a compiled LongFlow decode step spends its time (torch.profiler), beside its roofline.

Two ``generate`` calls of ``short`` and ``long`` new tokens are profiled; each kernel's GPU time
per decode step is the difference over ``long - short`` steps, so prefill and set-up cancel.
Kernels are grouped into what the roofline counts (the matmuls that read the weights, the fused
op's attention pass that reads the KV cache) and everything else: the lm_head's logits over the
vocabulary (the one matmul launched once a step), norms, RoPE, the SwiGLU activation, the fused
op's scoring pass (with the output merge), copies, and generate's own per-step work. The step's
wall time less its summed kernel time is time the GPU waits for the host (less whatever overlaps:
the scoring pass runs on a side stream beside the next kernels, `--serial-scoring` puts it back on
the model's stream).

    python bench/profile_step.py --shape qwen3-8b --batch 256 --budget 921
"""

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SHAPES,
    build_model,
    copy_bandwidth_gbs,
    environment,
    print_table,
    step_read_bytes,
    synchronize,
    write_results,
)

# (group, pattern on the kernel name, lower-cased); the first match wins.
GROUPS = [
    ("fused op: attention pass (reads the KV cache)", r"_attend_split_kernel"),
    ("fused op: scoring pass + output merge", r"_score_merge_kernel"),
    ("fused op: re-allocation", r"_reallocate_kernel"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|xmma|gemv|splitk|sm90_|sm80_|aten::mm|aten::addmm|aten::linear|aten::bmm"),
    ("norm (RMSNorm, with what inductor fused into it)", r"rsqrt"),
    ("RoPE", r"(cat.*neg|neg.*cat|cos|sin)"),
    ("SwiGLU activation", r"silu|sigmoid"),
    ("argmax / sampling", r"argmax|argmin|topk|sort|softmax|max_|reduce_kernel"),
    ("copies, fills, indexing, other elementwise", r"copy|memcpy|memset|fill|cat|index|gather|scatter|elementwise"),
]
LM_HEAD = "matmul: lm_head (logits over the vocabulary)"


def group_of(name: str, calls_per_step: float) -> str:
    """The group of a kernel (by name); a matmul launched once a step is the lm_head."""
    lowered = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, lowered):
            if group == "matmul" and round(calls_per_step) == 1:
                return LM_HEAD
            return "matmul: weights of the decoder layers" if group == "matmul" else group
    return "other"


def kernel_profile(run: Callable[[], object]) -> dict[str, tuple[float, int]]:
    """``{kernel name: (total ms, calls)}`` of the GPU kernels ``run`` launches (CPU operators off
    the GPU, so a CPU smoke run exercises the same code)."""
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    synchronize()
    with profile(activities=activities) as prof:
        run()
        synchronize()
    times = {}
    for event in prof.key_averages():
        if on_gpu and event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.key] = (event.device_time_total / 1e3, event.count)
        elif not on_gpu and event.key.startswith("aten::"):
            times[event.key] = (event.self_cpu_time_total / 1e3, event.count)
    return times


def per_step(short: dict, long: dict, steps: int) -> list[dict]:
    """Per-kernel time and calls per decode step from two profiles ``steps`` decode steps apart,
    grouped; rows sorted by time."""
    rows = []
    for name, (ms, calls) in long.items():
        ms_short, calls_short = short.get(name, (0.0, 0))
        ms_step, calls_step = (ms - ms_short) / steps, (calls - calls_short) / steps
        if ms_step > 0:
            rows.append({"kernel": name[:90], "ms_per_step": ms_step, "calls_per_step": calls_step,
                         "group": group_of(name, calls_step)})  # fmt: skip
    return sorted(rows, key=lambda row: -row["ms_per_step"])


def breakdown(kernels: list[dict], step_ms: float, roofline: dict) -> list[dict]:
    """Time per step by group, with its share of the measured step and the roofline's part where
    it has one; the last row is the time the GPU waited (step less kernels)."""
    totals: dict[str, float] = {}
    for row in kernels:
        totals[row["group"]] = totals.get(row["group"], 0.0) + row["ms_per_step"]
    busy = sum(totals.values())
    rows = [{"group": group, "ms_per_step": ms, "share_of_step": ms / step_ms, "roofline_ms": roofline.get(group)}
            for group, ms in sorted(totals.items(), key=lambda item: -item[1])]  # fmt: skip
    rows.append({"group": "GPU idle (host: generate's loop, launches)", "ms_per_step": step_ms - busy,
                 "share_of_step": (step_ms - busy) / step_ms, "roofline_ms": None})  # fmt: skip
    return rows


def roofline_parts(model, batch: int, slots: int, bandwidth_gbs: float) -> dict[str, float]:
    """Milliseconds each part of a decode step would take at the measured copy bandwidth, keyed by
    the group that reads it: the decoder layers' weights (with the step's embedding rows), the
    lm_head's, and the KV cache (``slots`` per sequence and layer); `common.step_read_bytes`."""
    parts = step_read_bytes(model, batch, slots)

    def ms(size: float) -> float:
        return size / (bandwidth_gbs * 1e9) * 1e3

    return {
        "matmul: weights of the decoder layers": ms(parts["decoder_weights"] + parts["embedding_rows"]),
        LM_HEAD: ms(parts["lm_head"]),
        "fused op: attention pass (reads the KV cache)": ms(parts["kv_cache"]),
    }


def profile_generate_step(generate: Callable[[int], object], short: int, long: int, step_ms: float,
                          roofline: dict) -> dict:  # fmt: skip
    """Profile ``generate(new_tokens)`` at ``short`` and ``long`` tokens (already compiled and
    captured: call it once first); returns the kernels and the grouped breakdown per step."""
    kernels = per_step(kernel_profile(lambda: generate(short)), kernel_profile(lambda: generate(long)), long - short)
    groups = breakdown(kernels, step_ms, roofline)
    # The decode step replays from a CUDA graph: if the profiler saw none of the fused op's kernels,
    # it did not record kernels inside graphs, and "GPU idle" holds them.
    graph_kernels_seen = any(row["group"].startswith("fused op") for row in kernels) or not torch.cuda.is_available()
    return {"step_ms": step_ms, "kernels": kernels[:40], "groups": groups, "roofline_ms": roofline,
            "graph_kernels_recorded": graph_kernels_seen}  # fmt: skip


def print_profile(result: dict) -> None:
    print(f"\nwhere a decode step's {result['step_ms']:.2f} ms go (GPU time per step, torch.profiler)")
    if not result["graph_kernels_recorded"]:
        print("the profiler recorded no kernel inside the CUDA graphs: 'GPU idle' includes the replayed step")
    print_table(result["groups"], ["group", "ms_per_step", "share_of_step", "roofline_ms"])
    print("\ntop kernels")
    print_table(result["kernels"][:12], ["kernel", "ms_per_step", "calls_per_step", "group"])


def main() -> None:
    import time

    import longflow_patch
    from longflow_patch.kernels import side_stream

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--budget", type=int, default=921)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (LongFlow's step does not depend on it)")
    parser.add_argument("--steps", type=int, nargs=2, default=[8, 24], metavar=("SHORT", "LONG"))
    parser.add_argument(
        "--serial-scoring",
        action="store_true",
        help="the scoring pass on the model's stream (apply runs it beside the next kernels)",
    )
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/profile_step_<shape>.json)")
    args = parser.parse_args()
    side_stream.OVERLAP_SCORING = not args.serial_scoring
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.shape, device)
    longflow_patch.apply(model, policy="longflow", budget=args.budget)  # compile="auto": compiled on one GPU
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), device=device)

    def generate(new_tokens: int) -> None:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)  # fmt: skip

    generate(args.steps[1])  # compile and capture
    seconds = []
    for tokens in args.steps:
        synchronize()
        start = time.perf_counter()
        generate(tokens)
        synchronize()
        seconds.append(time.perf_counter() - start)
    step_ms = (seconds[1] - seconds[0]) / (args.steps[1] - args.steps[0]) * 1e3
    bandwidth = copy_bandwidth_gbs() if device == "cuda" else 50.0
    result = profile_generate_step(generate, *args.steps, step_ms,
                                   roofline_parts(model, args.batch, args.budget, bandwidth))  # fmt: skip
    print_profile(result)
    settings = {"shape": args.shape, "batch": args.batch, "budget": args.budget, "prompt": args.prompt,
                "steps": args.steps, "copy_bandwidth_gbs": bandwidth,
                "scoring_beside": side_stream.OVERLAP_SCORING}  # fmt: skip
    payload = {"benchmark": "profile_step", "environment": environment(), "settings": settings, **result}
    write_results(args.out or f"bench/results/profile_step_{args.shape}.json", payload)


if __name__ == "__main__":
    main()
