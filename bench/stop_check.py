"""Compiled LongFlow's ``generate`` step with its stop check deferred (`apply`'s default on CUDA)
and read on the host every step (transformers' rule), shape after shape in one process.

For each output length (a cache shape: the largest batch under the memory cap, budget = 20% of
prompt + output, as in ``recipes/bench_throughput.py``) and each stop check in ``--orders``, in
the order given: the step time (two ``generate`` calls of different lengths, so prefill and
set-up cancel), and what the longer call did more than the shorter one, per step: host syncs
(``torch.cuda`` sync debug mode), CUDA-graph replays, recordings and warm-up runs of the compiled
step (inductor's CUDA-graph tree manager), allocator retries.

    python3 bench/stop_check.py --outputs 8192 16384 4096
"""

import argparse
import contextlib
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch._inductor import cudagraph_trees

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import longflow_patch

import bench_throughput as throughput
from common import SHAPES, build_model, environment, parse_args_on_gpu, print_table, synchronize, write_results

ROOT = Path(__file__).resolve().parents[1]
TREE_EVENTS = {"replays": "execute_node", "recordings": "record_function", "warm_ups": "run_eager"}
"""Counted methods of inductor's `CUDAGraphTreeManager`."""


def count_tree_events(counts: Counter) -> None:
    """Count calls of the CUDA-graph tree manager's methods into ``counts``."""
    manager = cudagraph_trees.CUDAGraphTreeManager
    for event, name in TREE_EVENTS.items():
        original = getattr(manager, name)

        def counted(self, *args, _original=original, _event=event, **kwargs):
            counts[_event] += 1
            return _original(self, *args, **kwargs)

        setattr(manager, name, counted)


def timed_call(model, batch: int, new_tokens: int, counts: Counter) -> dict:
    """One ``generate`` call of ``new_tokens``: seconds, host syncs and the events counted."""
    before = Counter(counts)
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            seconds = throughput.timed_generate(model, batch, 16, new_tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchronizing" in str(w.message) for w in caught)
    events = {event: counts[event] - before[event] for event in TREE_EVENTS}
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries
    return {"seconds": seconds, "syncs": syncs, "alloc_retries": retries, **events}


def measure(model, order: str, output: int, batch: int, steps: int, counts: Counter) -> dict:
    """Step time of compiled LongFlow at one shape with the stop check ``order`` (``deferred`` or
    ``per-step``), and the per-step difference of the counts between a long and a short call."""
    with throughput.per_step_stop_check() if order == "per-step" else contextlib.nullcontext():
        first = timed_call(model, batch, steps, counts)
        short, long = timed_call(model, batch, steps // 4, counts), timed_call(model, batch, steps, counts)
    span = steps - steps // 4
    step_ms = (long["seconds"] - short["seconds"]) / span * 1e3
    row = {"output": output, "batch": batch, "stop_check": order, "step_ms": step_ms, "first_call_s": first["seconds"]}
    for key in ("syncs", "alloc_retries", *TREE_EVENTS):
        row[f"{key}_per_step"] = (long[key] - short[key]) / span
        row[f"{key}_first_call"] = first[key]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--outputs", type=int, nargs="+", default=[8192, 16384, 4096])
    parser.add_argument("--orders", nargs="+", choices=["deferred", "per-step"], default=["deferred", "per-step"],
                        help="stop checks measured at each shape, in this order")  # fmt: skip
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--memory-cap-gb", type=float, default=70.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stop_check.json")
    args = parse_args_on_gpu(parser)
    model = build_model(args.shape, "cuda")
    counts: Counter = Counter()
    count_tree_events(counts)
    rows, start = [], time.time()
    settings = {"benchmark": "stop_check", "environment": environment(), **vars(args), "out": str(args.out)}
    for output in args.outputs:
        budget = throughput.longflow_budget(args.prompt, output)
        batch = throughput.largest_batch(model, budget, args.memory_cap_gb * 1e9, 256)
        longflow_patch.apply(model, policy="longflow", budget=budget)
        for order in args.orders:
            rows.append(measure(model, order, output, batch, args.steps, counts))
            print(f"[{time.time() - start:.0f} s] {rows[-1]}", flush=True)
            write_results(args.out, {**settings, "rows": rows})
        throughput.release(model)
    synchronize()
    columns = ["output", "batch", "stop_check", "step_ms", "first_call_s", "syncs_per_step", "replays_per_step",
               "recordings_per_step", "warm_ups_per_step", "alloc_retries_per_step"]  # fmt: skip
    print_table(rows, columns)


if __name__ == "__main__":
    main()
