"""The fused decode op of this tree against an earlier version of its kernel file, in one process.

    git show REV:kernels/decode_attention.py > /tmp/baseline.py
    python3 bench/kernel_ab.py --baseline /tmp/baseline.py --label REV
    git archive REV kernels | tar -x -C /tmp/REV     # the whole folder: its own launch helpers too
    python3 bench/kernel_ab.py --baseline /tmp/REV/kernels --label REV

A baseline file is loaded as a module of ``longflow_patch.kernels`` (its relative imports resolve
to this tree's launch helpers, reference, online-softmax blocks and side stream); a baseline
folder as a package of its own, whose kernel file imports the folder's helpers (to time a change
to `launch.py`). Both versions run the same inputs (`decode_op.make_inputs`: 32 query / 8 KV
heads, head_dim 128, bf16, shared eviction, contribution scores), interleaved round by round,
medians over the rounds:

- ``eager``, batch 1: one eager decode step as the cache runs it (scratch kept, direct launches
  of the compiled kernels), from the wall clock per call over 50 calls in a row and from CUDA
  events around one call, beside SDPA's eager call (``enable_gqa``, attention only);
- ``graph``: GPU time of one step replayed in a CUDA graph (no launch overhead), beside SDPA's.

Before timing, each shape checks that both versions choose the same next write slots and give the
same output up to bf16 rounding (a difference is an error, not a row), and records whether the
outputs are equal bit for bit.

``--preparation qwen3`` hands the CUDA-graph rows the new token before Qwen3's q/k norms and RoPE,
which the op applies (what a Qwen3 step sends on a GPU); ``--shapes 64x921 ...`` picks those rows and
``--no-eager`` skips the batch-1 rows.
"""

import argparse
import importlib
import importlib.util
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script with -P too, like the other benches
from longflow_patch.kernels import decode_attention as current

import common
from common import environment, graph_median_ms, interleaved_call_us, print_table, write_results
from decode_op import SETTINGS, make_inputs, sdpa_call

EAGER_SLOTS = [1024, 4096, 16384]
# Powers of two, then the 8B throughput rows' batch x budget (budgets off any power of two).
GRAPH_SHAPES = [(1, 1024), (1, 16384), (8, 4096), (32, 4096), (128, 4096), (128, 16384),
                (64, 921), (64, 1740), (171, 1740), (95, 3379)]  # fmt: skip


def load_baseline(path: Path, name: str = "longflow_patch.kernels.baseline") -> object:
    """``path`` (a copy of ``kernels/decode_attention.py``) as module ``name`` of the package; or,
    where ``path`` is a copy of the ``kernels/`` folder, its ``decode_attention`` with the folder as
    package ``name`` (its relative imports stay inside the folder)."""
    if path.is_dir():
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
        return importlib.import_module(f"{name}.decode_attention")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def step_call(module: object, inputs: dict, workspaces: dict | None):
    """One decode step of ``module``'s launcher on ``inputs``; ``workspaces``: kept scratch (eager),
    or None (fresh scratch per call, as under CUDA-graph capture)."""
    return lambda: module.decode_attention_triton(**inputs, **SETTINGS, workspaces=workspaces)


def same_step(baseline: object, batch: int, slots: int, preparation: str) -> bool:
    """Both versions on copies of one step: whether the outputs are equal bit for bit. Next write
    slots that differ, or outputs beyond rounding (bf16), are an error."""
    inputs = make_inputs(batch, slots, preparation=preparation)
    copies = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()} for _ in range(2)]
    outputs = [baseline.decode_attention_triton(**copies[0], **SETTINGS),
               current.decode_attention_triton(**copies[1], **SETTINGS)]  # fmt: skip
    if not torch.equal(copies[0]["write_slot"], copies[1]["write_slot"]) or not torch.allclose(
        *(out.float() for out in outputs), rtol=1e-2, atol=1e-3
    ):
        raise SystemExit(f"kernel_ab: the versions differ at batch {batch}, {slots} slots")
    return torch.equal(*outputs)


def eager_row(baseline: object, slots: int, rounds: int) -> dict:
    inputs = make_inputs(1, slots)
    calls = {"baseline": step_call(baseline, inputs, {}), "current": step_call(current, inputs, {}),
             "sdpa": sdpa_call(inputs)}  # fmt: skip
    row = {"batch": 1, "slots": slots, **interleaved_call_us(calls, rounds)}
    for clock in ("wall", "event"):
        row[f"current/baseline {clock}"] = row[f"current_{clock}_us"] / row[f"baseline_{clock}_us"]
        row[f"current/sdpa {clock}"] = row[f"current_{clock}_us"] / row[f"sdpa_{clock}_us"]
        row[f"baseline/sdpa {clock}"] = row[f"baseline_{clock}_us"] / row[f"sdpa_{clock}_us"]
    return row


def interleaved_graph_us(calls: dict, rounds: int) -> dict[str, float]:
    """``{name}_us``: each call's median GPU time in a CUDA graph over ``rounds`` rounds, the calls
    timed in turn within each round."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(graph_median_ms(call) * 1e3)
    return {f"{name}_us": statistics.median(t) for name, t in times.items()}


def graph_row(baseline: object, batch: int, slots: int, rounds: int, preparation: str) -> dict:
    inputs = make_inputs(batch, slots, preparation=preparation)
    calls = {"baseline": step_call(baseline, inputs, None), "current": step_call(current, inputs, None),
             "sdpa": sdpa_call(inputs)}  # fmt: skip
    row = {"batch": batch, "slots": slots, **interleaved_graph_us(calls, rounds)}
    row["current/baseline"] = row["current_us"] / row["baseline_us"]
    row["current/sdpa"] = row["current_us"] / row["sdpa_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="an earlier kernel file, or kernels/ folder (required)")
    parser.add_argument("--label", help="what the baseline is, e.g. the revision it came from (required)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preparation", choices=["none", "rope", "qwen3"], default="none",
                        help="the new token as it comes (none), or before RoPE (rope) and Qwen3's q/k norms (qwen3), "
                        "which the op applies; batch-1 eager rows always take it as it comes")  # fmt: skip
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="BATCHxSLOTS",
        help="the CUDA-graph rows (default: powers of two and the 8B throughput rows)",
    )
    parser.add_argument("--no-eager", action="store_true", help="skip the batch-1 eager rows")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernel_ab.json"))
    args = common.parse_args_on_gpu(parser)
    if args.baseline is None or args.label is None:
        parser.error("--baseline and --label are required")
    import longflow_patch  # noqa: F401  (registers the op)

    baseline = load_baseline(args.baseline)
    graph_shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes] if args.shapes else GRAPH_SHAPES
    eager_slots = [] if args.no_eager else EAGER_SLOTS
    bit_equal = {f"{batch}x{slots}": same_step(baseline, batch, slots, args.preparation)
                 for batch, slots in [(1, slots) for slots in eager_slots] + graph_shapes}  # fmt: skip
    print(f"outputs equal bit for bit (batch x slots): {bit_equal}")
    eager = [eager_row(baseline, slots, args.rounds) for slots in eager_slots]
    if eager:
        print(f"eager step at batch 1, us (baseline: {args.label}; medians of {args.rounds} interleaved rounds)")
        columns = [f"{name}_{clock}_us" for clock in ("wall", "event") for name in ("baseline", "current", "sdpa")]
        columns += [f"{ratio} {clock}" for clock in ("wall", "event")
                    for ratio in ("current/baseline", "baseline/sdpa", "current/sdpa")]  # fmt: skip
        print_table(eager, ["slots", *columns])
    graph = [graph_row(baseline, batch, slots, args.rounds, args.preparation) for batch, slots in graph_shapes]
    print("\nGPU time per step in a CUDA graph, us")
    print_table(graph, ["batch", "slots", "baseline_us", "current_us", "sdpa_us", "current/baseline", "current/sdpa"])
    write_results(args.out, {"benchmark": "kernel_ab", "environment": environment(), "baseline": args.label,
                             "settings": SETTINGS, "preparation": args.preparation, "rounds": args.rounds,
                             "outputs_bit_equal": bit_equal, "eager": eager, "graph": graph})  # fmt: skip


if __name__ == "__main__":
    main()
