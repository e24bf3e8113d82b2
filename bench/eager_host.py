"""Where the host time of one eager decode step goes at batch 1, against SDPA's call.

At batch 1 an eager step is host-bound: the GPU waits for the launches. This times, on the host
only (the wall clock over 100 calls in a row, then one synchronisation; medians over rounds in
which the parts take turns), at 32 query / 8 KV heads, head_dim 128, bf16:

- ``step``: the eager decode step as the cache runs it (`decode_attention_triton` with kept
  launches and direct launches of the compiled kernels);
- ``step python``: the same with the two launches stubbed out (its Python: lookup, checks, output);
- ``attend`` / ``score``: one launch of each pass as the step makes it (`KernelLaunch`), and the
  compiled kernel's launcher called bare, with the tensors and with their addresses as integers
  (for a tensor the launcher calls ``data_ptr()`` and asks the driver whether the address is
  device memory);
- ``sdpa``: ``scaled_dot_product_attention`` with ``enable_gqa`` over the same cache.

    python3 bench/eager_host.py [--slots 1024 4096] [--rounds 5] [--out bench/results/eager_host.json]
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also under python -P
from longflow_patch.kernels import decode_attention
from longflow_patch.kernels.launch import KernelLaunch

import common
from common import environment, print_table, write_results
from decode_op import SETTINGS, make_inputs, sdpa_call


def host_us(fn: Callable[[], object], calls: int = 100, repeats: int = 5) -> float:
    """Median host time of one ``fn`` call in µs, over ``repeats`` runs of ``calls`` calls in a row
    (few enough that the GPU's queue never fills and blocks the host)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def recorded_launches(step: Callable[[], object]) -> list[tuple[KernelLaunch, tuple, int]]:
    """Each launch one ``step`` call makes: the `KernelLaunch`, its tensors and its stream."""
    launches = []
    launch = KernelLaunch.__call__

    def record(self, *tensors, direct=False, stream=None):
        launches.append((self, tensors, stream))
        return launch(self, *tensors, direct=direct, stream=stream)

    KernelLaunch.__call__ = record
    try:
        step()
    finally:
        KernelLaunch.__call__ = launch
    return launches


def bare_launch(launch: KernelLaunch, arguments: tuple, stream: int) -> Callable[[], None]:
    """The compiled kernel's launcher called with ``arguments`` (then the fixed ones), no hooks."""
    compiled, grid, args = launch.compiled, launch.grid, (*arguments, *launch.fixed_tail)
    return lambda: compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)


def parts(slots: int) -> dict[str, Callable[[], object]]:
    """The timed calls at batch 1 over ``slots`` slots (see the module docstring)."""
    inputs = make_inputs(1, slots)
    workspaces = {}

    def step():
        return decode_attention.decode_attention_triton(**inputs, **SETTINGS, workspaces=workspaces)

    for _ in range(3):  # the first call compiles and keeps the launches; later ones launch directly
        step()
    calls = {"step": step, "sdpa": sdpa_call(inputs)}
    for name, (launch, tensors, stream) in zip(("attend", "score"), recorded_launches(step), strict=True):
        if launch.compiled is None:
            raise SystemExit(f"eager_host: the {name} launch kept no compiled kernel (direct launches off?)")
        calls[name] = lambda launch=launch, tensors=tensors, stream=stream: launch(*tensors, direct=True, stream=stream)
        calls[f"{name} bare, tensors"] = bare_launch(launch, tensors, stream)
        calls[f"{name} bare, addresses"] = bare_launch(launch, tuple(t.data_ptr() for t in tensors), stream)
    return calls


def stubbed(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with every `KernelLaunch` call a no-op: its Python alone."""

    def call():
        launch, KernelLaunch.__call__ = KernelLaunch.__call__, lambda self, *tensors, **kwargs: None
        try:
            return step()
        finally:
            KernelLaunch.__call__ = launch

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/eager_host.json"))
    args = common.parse_args_on_gpu(parser)
    import longflow_patch  # noqa: F401  (registers the op)

    rows = []
    for slots in args.slots:
        calls = parts(slots)
        calls["step python"] = stubbed(calls["step"])
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                times[name].append(host_us(call))
        row = {"slots": slots, **{f"{name} us": statistics.median(values) for name, values in times.items()}}
        row["step / sdpa"] = row["step us"] / row["sdpa us"]
        rows.append(row)
    print(f"host time per call at batch 1, us (medians of {args.rounds} rounds)")
    print_table(rows, ["slots", *(key for key in rows[0] if key != "slots")])
    write_results(args.out, {"benchmark": "eager_host", "environment": environment(), "settings": SETTINGS,
                             "rounds": args.rounds, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
