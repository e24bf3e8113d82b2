"""How close the decoder's weight matmuls of one decode step come to their weight reads, per shape.

A decode step at batch ``M`` multiplies ``M`` rows by each weight once: the time floor is the
weight bytes over the measured copy bandwidth. For each shape of a Qwen3 layer (q/o, k/v, gate/up,
down) and for the fused shapes an engine that concatenates weights runs (q+k+v, gate+up), this
times ``F.linear`` over ``--layers`` distinct weights captured in one CUDA graph (as a compiled
decode step replays them; no weight stays in L2 from one call to the next) and reports the time a
call, the floor, and their ratio. ``--autotune`` adds inductor's ``max-autotune`` choice per shape
(Triton GEMM templates against cuBLAS).

A second floor is the matmul's arithmetic at the bf16 rate cuBLAS reaches on a large square
product in the same process (`common.matmul_tflops`): at batch 64 it is a fraction of the weight read,
but from about batch 200 up on an H100 the two are of one size, and a matmul cannot reach either
floor without the other overlapping it perfectly. ``ratio_to_larger_floor`` compares each call
with the larger of the two.

The per-layer totals compare the layer as transformers computes it (7 matmuls) with the fused
layout (4 matmuls), each against the same weight bytes.

    python bench/decoder_gemms.py --shape qwen3-8b --batches 64 128 --autotune
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules (`common`), also under python -P
from common import (
    SHAPES,
    copy_bandwidth_gbs,
    environment,
    graph_median_ms,
    matmul_tflops,
    parse_args_on_gpu,
    print_table,
    write_results,
)


def weight_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each distinct matmul of a decoder layer, separate and fused."""
    s = SHAPES[shape]
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    q_out, kv_out = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    return {
        "q": (q_out, hidden),
        "k": (kv_out, hidden),
        "o": (hidden, q_out),
        "gate": (inter, hidden),
        "down": (hidden, inter),
        "qkv": (q_out + 2 * kv_out, hidden),
        "gate_up": (2 * inter, hidden),
    }


# Calls a layer makes of each shape, as transformers computes it and with fused weights.
SEPARATE_LAYER = {"q": 1, "k": 2, "o": 1, "gate": 2, "down": 1}
FUSED_LAYER = {"qkv": 1, "o": 1, "gate_up": 1, "down": 1}


def time_linear(linear, rows: int, weights: list[torch.Tensor]) -> float:
    """Median GPU ms of one ``linear(x, w)`` call, the calls cycling through ``weights`` in one graph."""
    x = torch.randn(rows, weights[0].shape[1], device="cuda", dtype=weights[0].dtype)

    def all_layers() -> None:
        for w in weights:
            linear(x, w)

    return graph_median_ms(all_layers, calls_per_graph=1, repeats=15) / len(weights)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-8b", choices=[s for s in SHAPES if s != "tiny"])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--layers", type=int, default=16, help="distinct weights per shape (L2 stays cold)")
    parser.add_argument("--autotune", action="store_true", help="also inductor's max-autotune choice per shape")
    parser.add_argument("--out", default="bench/results/decoder_gemms.json")
    args = parse_args_on_gpu(parser, argv)

    bandwidth = copy_bandwidth_gbs()
    tflops = matmul_tflops()
    shapes = weight_shapes(args.shape)
    backends = ["cublas", "max-autotune"] if args.autotune else ["cublas"]
    rows, totals = [], []
    for name, (out_features, in_features) in shapes.items():
        weights = [
            torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
            for _ in range(args.layers)
        ]
        floor_ms = weights[0].numel() * 2 / (bandwidth * 1e6)
        for batch in args.batches:
            for backend in backends:
                start = time.perf_counter()
                linear = F.linear
                if backend == "max-autotune":
                    torch._dynamo.reset()  # a fresh compile per shape: no recompile limit, no stale choice
                    linear = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
                ms = time_linear(linear, batch, weights)
                compute_floor_ms = 2 * batch * out_features * in_features / (tflops * 1e9)
                rows.append(
                    dict(shape=name, n=out_features, k=in_features, batch=batch, backend=backend, ms=ms,
                         floor_ms=floor_ms, ratio=ms / floor_ms, compute_floor_ms=compute_floor_ms,
                         ratio_to_larger_floor=ms / max(floor_ms, compute_floor_ms),
                         setup_s=time.perf_counter() - start)
                )  # fmt: skip
        del weights
        torch.cuda.empty_cache()
    print(f"copy bandwidth {bandwidth:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s (8192-cubed)")
    print_table(rows, ["shape", "n", "k", "batch", "backend", "ms", "floor_ms", "ratio", "compute_floor_ms",
                       "ratio_to_larger_floor", "setup_s"])  # fmt: skip

    def layer_ms(layout: dict[str, int], batch: int, backend: str, key: str) -> float:
        by_shape = {r["shape"]: r[key] for r in rows if r["batch"] == batch and r["backend"] == backend}
        return sum(count * by_shape[name] for name, count in layout.items())

    for batch in args.batches:
        for backend in backends:
            floor = layer_ms(SEPARATE_LAYER, batch, backend, "floor_ms")
            separate = layer_ms(SEPARATE_LAYER, batch, backend, "ms")
            fused = layer_ms(FUSED_LAYER, batch, backend, "ms")
            totals.append(
                dict(batch=batch, backend=backend, floor_ms=floor, separate_ms=separate, fused_ms=fused,
                     separate_ratio=separate / floor, fused_ratio=fused / floor, fused_over_separate=fused / separate)
            )  # fmt: skip
    print("\nper decoder layer (separate: q, k, v, o, gate, up, down; fused: qkv, o, gate_up, down)")
    print_table(totals, ["batch", "backend", "floor_ms", "separate_ms", "fused_ms", "separate_ratio", "fused_ratio",
                         "fused_over_separate"])  # fmt: skip
    write_results(
        args.out,
        dict(benchmark="decoder_gemms", environment=environment(),
             settings=dict(shape=args.shape, batches=args.batches, layers=args.layers, copy_bandwidth_gbs=bandwidth,
                           matmul_tflops=tflops),
             shapes=rows, per_layer=totals),
    )  # fmt: skip


if __name__ == "__main__":
    main()
