"""Benchmark the fused decode op against SDPA attention over the same cache and the HBM floor.

Shape: 32 query heads, 8 KV heads, head_dim 128, bf16 (Qwen3-8B / Llama-3-8B attention), one
decode step, every slot holding a token. For each batch x cache size it reports:

- ``fused``: ``longflow.decode_attention`` (write + attention + importance + next slot);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa`` (attention only);
- ``floor``: bytes of K and V read once over the measured copy bandwidth.

Times are GPU time per call from CUDA-graph replay (``graph``), the way a compiled decode loop
runs, and also eager (``eager``: Python launch overhead included). Medians after warm-up.

    python bench/decode_op.py                 # the table of the issue
    python bench/decode_op.py --sweep         # also sweep the attention pass's launch shape
    python bench/decode_op.py --score-sweep   # also time the scoring pass's launch shapes side by side
"""

import argparse
import itertools

import torch
import torch.nn.functional as F

from longflow_patch.kernels.decode_attention import AttendLaunch, ScoreLaunch, decode_attention_triton

import common
from common import copy_bandwidth_gbs, environment, graph_median_ms, median_ms, print_table, write_results

QUERY_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
# Scoring-pass launch shapes timed by --score-sweep: the default first, the earlier one (256, 8) second.
SCORE_LAUNCHES = [ScoreLaunch(), ScoreLaunch(256, 8), ScoreLaunch(256, 4), ScoreLaunch(512, 8), ScoreLaunch(1024, 4)]


def make_inputs(batch: int, slots: int, limits: torch.Tensor | None = None) -> dict:
    """Decode-op inputs with a token in every usable slot: all ``slots`` of each KV head, or the
    first ``limits[b, h]`` (``[B, Hkv]`` int32, ragged budgets) with the rest empty."""
    device, dtype = "cuda", torch.bfloat16
    limits = torch.full((batch, KV_HEADS), slots, dtype=torch.int32) if limits is None else limits
    limits = limits.to(device=device, dtype=torch.int32).contiguous()
    slot = torch.arange(slots, dtype=torch.int32, device=device)
    return dict(
        q=torch.randn(batch, QUERY_HEADS, HEAD_DIM, dtype=dtype, device=device),
        k_new=torch.randn(batch, KV_HEADS, HEAD_DIM, dtype=dtype, device=device),
        v_new=torch.randn(batch, KV_HEADS, HEAD_DIM, dtype=dtype, device=device),
        k_cache=torch.randn(batch, KV_HEADS, slots, HEAD_DIM, dtype=dtype, device=device),
        v_cache=torch.randn(batch, KV_HEADS, slots, HEAD_DIM, dtype=dtype, device=device),
        value_norm=torch.rand(batch, KV_HEADS, slots, device=device) * HEAD_DIM,
        slot_pos=torch.where(slot < limits[..., None], slot, -1).contiguous(),
        write_slot=limits // 2,
        position=torch.full((batch,), slots, dtype=torch.int32, device=device),
        slot_limit=limits,
        accumulated=None,
    )


def fused_call(inputs: dict, launch: AttendLaunch | None = None, score_launch: ScoreLaunch | None = None,
               shared: bool = True):  # fmt: skip
    settings = dict(scale=HEAD_DIM**-0.5, sink_tokens=4, recent_window=8, shared=shared, score_kind=0)
    if launch is None and score_launch is None:
        return lambda: torch.ops.longflow.decode_attention(*inputs.values(), *settings.values())
    return lambda: decode_attention_triton(**inputs, **settings, launch=launch, score_launch=score_launch)


def sdpa_call(inputs: dict):
    q = inputs["q"][:, :, None]
    k, v = inputs["k_cache"], inputs["v_cache"]
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def kernel_times_us(fn, calls: int = 20) -> dict[str, float]:
    """Mean GPU time per call of each kernel ``fn`` launches, in microseconds (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {
        event.key[:40]: event.device_time_total / calls for event in prof.key_averages() if event.device_time_total > 0
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--slots", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--sweep", action="store_true", help="time launch-shape variants of the attention pass")
    parser.add_argument(
        "--score-sweep",
        action="store_true",
        help="time the scoring pass's launch shapes, shared and per-head eviction, side by side",
    )
    parser.add_argument("--profile", action="store_true", help="print GPU time per kernel (torch.profiler)")
    parser.add_argument("--out", default="bench/results/decode_op.json")
    args = common.parse_args_on_gpu(parser)
    import longflow_patch  # noqa: F401  (registers the op)

    bandwidth = copy_bandwidth_gbs()
    print(f"device copy bandwidth: {bandwidth:.0f} GB/s (read + write)")
    rows, sweep_rows, score_rows = [], [], []
    for batch, slots in itertools.product(args.batches, args.slots):
        inputs = make_inputs(batch, slots)
        kv_bytes = 2 * inputs["k_cache"].numel() * inputs["k_cache"].element_size()
        row = {"batch": batch, "slots": slots, "floor_ms": kv_bytes / (bandwidth * 1e9) * 1e3}
        row["fused_graph_ms"] = graph_median_ms(fused_call(inputs))
        row["sdpa_graph_ms"] = graph_median_ms(sdpa_call(inputs))
        row["fused_eager_ms"] = median_ms(fused_call(inputs))
        row["sdpa_eager_ms"] = median_ms(sdpa_call(inputs))
        row["fused/sdpa"] = row["fused_graph_ms"] / row["sdpa_graph_ms"]
        row["fused/floor"] = row["fused_graph_ms"] / row["floor_ms"]
        row["sdpa/floor"] = row["sdpa_graph_ms"] / row["floor_ms"]
        row["eager fused/sdpa"] = row["fused_eager_ms"] / row["sdpa_eager_ms"]
        rows.append(row)
        if args.profile:
            for name, call in (("fused", fused_call(inputs)), ("sdpa", sdpa_call(inputs))):
                times = kernel_times_us(call)
                row[f"{name}_kernels_us"] = times
                print(f"b={batch} s={slots} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
        if args.sweep and (batch, slots) in {(128, 1024), (32, 4096), (1, 16384), (8, 16384), (1, 1024), (128, 16384)}:
            for block_s, warps, stages, tiles in itertools.product((64, 128), (4, 8), (2, 3), (1, 4)):
                launch = AttendLaunch(block_s, warps, stages, tiles)
                try:
                    ms = graph_median_ms(fused_call(inputs, launch))
                except Exception as error:  # a shape Triton cannot fit (shared memory) is reported, not fatal
                    print(f"skip {launch}: {type(error).__name__}")
                    continue
                sweep_rows.append(
                    {
                        "batch": batch,
                        "slots": slots,
                        "block_s": block_s,
                        "warps": warps,
                        "stages": stages,
                        "min_tiles": tiles,
                        "ms": ms,
                        "vs_floor": ms / row["floor_ms"],
                    }
                )
        if args.score_sweep:  # whole-step time; vs_default is against the first (default) launch
            for shared in (True, False):
                times = [graph_median_ms(fused_call(inputs, score_launch=launch, shared=shared))
                         for launch in SCORE_LAUNCHES]  # fmt: skip
                score_rows += [{"batch": batch, "slots": slots, "shared": shared, "block": launch.block,
                                "warps": launch.num_warps, "ms": ms, "vs_default": ms / times[0]}
                               for launch, ms in zip(SCORE_LAUNCHES, times, strict=True)]  # fmt: skip
        del inputs
        torch.cuda.empty_cache()

    if sweep_rows:
        print("\nlaunch sweep (best 3 per shape)")
        best = []
        for shape in sorted({(r["batch"], r["slots"]) for r in sweep_rows}):
            best += sorted((r for r in sweep_rows if (r["batch"], r["slots"]) == shape), key=lambda r: r["ms"])[:3]
        print_table(best, ["batch", "slots", "block_s", "warps", "stages", "min_tiles", "ms", "vs_floor"])
    if score_rows:
        print("\nscoring-pass launch shapes (whole step, ms; vs_default: against block 512, 4 warps)")
        print_table(score_rows, ["batch", "slots", "shared", "block", "warps", "ms", "vs_default"])
    print()
    print_table(
        rows,
        [
            "batch",
            "slots",
            "floor_ms",
            "sdpa_graph_ms",
            "fused_graph_ms",
            "fused/sdpa",
            "fused/floor",
            "sdpa/floor",
            "fused_eager_ms",
            "sdpa_eager_ms",
            "eager fused/sdpa",
        ],
    )
    write_results(
        args.out,
        {
            "benchmark": "decode_op",
            "environment": environment(),
            "copy_bandwidth_gbs": bandwidth,
            "shape": {"query_heads": QUERY_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
            "rows": rows,
            "sweep": sweep_rows,
            "score_sweep": score_rows,
        },
    )


if __name__ == "__main__":
    main()
