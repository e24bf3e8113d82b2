"""Timing helpers shared by the benchmarks: CUDA-event medians, graph replay, environment record."""

import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch


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
    }


def median_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 30) -> float:
    """Median wall time of ``fn`` on the GPU, in ms, from CUDA events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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


def copy_bandwidth_gbs(gigabytes: float = 2.0) -> float:
    """Measured device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    source = torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), warmup=3, repeats=10)
    return 2 * source.numel() / (ms * 1e-3) / 1e9


def write_results(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).rjust(widths[c]) for c in columns))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
