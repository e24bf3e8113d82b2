"""Benchmark the fused decode op against SDPA attention over the same cache and the HBM floor.

Shape: 32 query heads, 8 KV heads, head_dim 128, bf16 (Qwen3-8B / Llama-3-8B attention), one
decode step, every slot holding a token. For each batch x cache size it reports:

- ``fused``: ``longflow.decode_attention`` (write + attention + importance + next slot);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa`` (attention only);
- ``floor``: bytes of K and V read once over the measured copy bandwidth.

Times are GPU time per call from CUDA-graph replay (``graph``), the way a compiled decode loop
runs, and also eager (``eager``: Python launch overhead included). Medians after warm-up.

``--eager`` times one eager call at batch 1, where the host is the bottleneck, four ways: the
registered op (``torch.ops.longflow.decode_attention``: what ``torch.compile`` traces), the
eager decode step (``longflow_patch.ops.decode_step``: what the cache calls when not compiled;
no ``torch.library`` dispatch, scratch buffers kept, every launch through Triton's JIT: what
``LONGFLOW_DIRECT_LAUNCH=0`` gives), the same with direct launches of the compiled kernels
(``direct``: the default, no Triton JIT after the first call)
and SDPA; each from CUDA events around one call and from the wall clock over 50 back-to-back
calls, medians over 5 rounds in which the four take turns, with the ratios to SDPA.

``--candidates`` times the attention of full-cache decoding candidates (one CUDA-graph replay
each): the split-K GQA kernel of ``longflow::verify_attention`` with one query over a cache of
``capacity`` slots of which the first ``filled`` hold tokens (it reads only those), SDPA
(``enable_gqa``) over exactly the filled slots (a shape that changes every step, so no static
graph could use it) and SDPA over the whole capacity (what a static cache reads).

    python bench/decode_op.py                 # the table of the issue
    python bench/decode_op.py --eager         # batch-1 eager overhead only
    python bench/decode_op.py --sweep         # also sweep the attention pass's launch shape at each shape
    python bench/decode_op.py --score-sweep   # also time the scoring pass's launch shapes side by side

``--preparation qwen3`` hands the batch rows and sweeps the new query and key before Qwen3's q/k
norms and RoPE, which the op then applies (what a Qwen3 decode step sends on a GPU); ``rope``, RoPE only.
"""

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from longflow_patch.kernels import launch
from longflow_patch.kernels.decode_attention import (
    AttendLaunch,
    ScoreLaunch,
    decode_attention_triton,
    multiprocessor_count,
    plan_decode,
)
from longflow_patch.ops import decode_step

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules (`common`), also under python -P
import common
from common import (
    copy_bandwidth_gbs,
    environment,
    graph_median_ms,
    interleaved_call_us,
    median_ms,
    print_table,
    wall_ms_per_call,
    write_results,
)

QUERY_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
# Scoring-pass launch shapes timed by --score-sweep, the default first. With shared eviction the 32
# query heads cap a tile at tile_logits / 32 slots, so `block` only matters per KV head there.
SCORE_LAUNCHES = [
    ScoreLaunch(),
    ScoreLaunch(256, 8),
    ScoreLaunch(num_warps=8),
    ScoreLaunch(num_warps=1),
    ScoreLaunch(num_warps=2),
    ScoreLaunch(1024, 4),
    ScoreLaunch(tile_logits=2048),
    ScoreLaunch(tile_logits=8192),
    ScoreLaunch(tile_logits=8192, num_warps=8),
    ScoreLaunch(programs_per_sm=4),
    ScoreLaunch(programs_per_sm=64),
    ScoreLaunch(tile_logits=2048, programs_per_sm=64),
]
# Attention-pass launch shapes timed by --sweep at every batch x slots given, the default first:
# slots per tile, warps, pipeline stages. Smaller tiles take less shared memory, so more programs
# fit an SM (at the throughput rows' batches each head is one split, one program).
ATTEND_LAUNCHES = (
    [AttendLaunch()]
    + [
        AttendLaunch(*shape)
        for shape in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))
        if AttendLaunch(*shape) != AttendLaunch()
    ]
    + [  # more splits than two waves want, with 4 warps
        AttendLaunch(block_s, 4, stages, waves=waves)
        for block_s, stages in ((32, 3), (64, 2), (128, 2))
        for waves in (4, 8)
    ]
    + [  # registers capped so that an SM holds 3 (168) or 4 (128) programs where shared memory allows
        AttendLaunch(block_s, 4, stages, waves=waves, max_registers=registers)
        for block_s, stages in ((32, 2), (32, 3), (64, 2), (64, 3))
        for registers in (128, 168)
        for waves in (2, 4)
    ]
)
SETTINGS = dict(scale=HEAD_DIM**-0.5, sink_tokens=4, recent_window=8, shared=True, score_kind=0)
# Full-cache candidates at the 8B shape's baseline operating points (batch, capacity, filled):
# half-way through 4k, 8k and 32k outputs after a 512-token prompt, at the largest batch in 70 GB.
CANDIDATE_SHAPES = [(71, 4608, 2560), (38, 8704, 4608), (10, 33280, 16896)]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(batch: int, slots: int, limits: torch.Tensor | None = None, preparation: str = "none") -> dict:
    """Decode-op inputs with a token in every usable slot: all ``slots`` of each KV head, or the
    first ``limits[b, h]`` (``[B, Hkv]`` int32, ragged budgets) with the rest empty.
    ``preparation``: "none" (q and k come rotated), "rope" (the op rotates them: RoPE tables) or
    "qwen3" (the op applies Qwen3's q/k norms too: also norm weights)."""
    where, dtype = device(), torch.bfloat16
    limits = torch.full((batch, KV_HEADS), slots, dtype=torch.int32) if limits is None else limits
    limits = limits.to(device=where, dtype=torch.int32).contiguous()
    slot = torch.arange(slots, dtype=torch.int32, device=where)
    inputs = dict(
        q=torch.randn(batch, QUERY_HEADS, HEAD_DIM, dtype=dtype, device=where),
        k_new=torch.randn(batch, KV_HEADS, HEAD_DIM, dtype=dtype, device=where),
        v_new=torch.randn(batch, KV_HEADS, HEAD_DIM, dtype=dtype, device=where),
        k_cache=torch.randn(batch, KV_HEADS, slots, HEAD_DIM, dtype=dtype, device=where),
        v_cache=torch.randn(batch, KV_HEADS, slots, HEAD_DIM, dtype=dtype, device=where),
        value_norm=torch.rand(batch, KV_HEADS, slots, device=where) * HEAD_DIM,
        slot_pos=torch.where(slot < limits[..., None], slot, -1).contiguous(),
        write_slot=limits // 2,
        position=torch.full((batch,), slots, dtype=torch.int32, device=where),
        slot_limit=limits,
        accumulated=None,
    )
    if preparation != "none":  # keyword arguments only: they come after the op's settings
        angles = torch.rand(1, HEAD_DIM, device=where) * 100
        inputs.update(cos=angles.cos().to(dtype).expand(batch, -1), sin=angles.sin().to(dtype).expand(batch, -1))
    if preparation == "qwen3":
        weight = torch.ones(HEAD_DIM, dtype=dtype, device=where)
        inputs.update(q_norm_weight=weight, k_norm_weight=weight.clone(), norm_eps=1e-6)
    return inputs


PREPARATION_KEYS = ("cos", "sin", "q_norm_weight", "k_norm_weight", "norm_eps")


def op_arguments(inputs: dict, shared: bool = True) -> tuple:
    """`make_inputs`'s inputs and `SETTINGS` as the op's positional arguments (the new token's
    tables and weights, where given, come after the settings and the re-allocation ones)."""
    tensors = [value for key, value in inputs.items() if key not in PREPARATION_KEYS]
    preparation = [inputs[key] for key in PREPARATION_KEYS if key in inputs]
    reallocation = [0, 0, 0] if preparation else []  # planned_slots, reallocate_every, min_limit
    return (*tensors, *{**SETTINGS, "shared": shared}.values(), *reallocation, *preparation)


def fused_call(inputs: dict, launch: AttendLaunch | None = None, score_launch: ScoreLaunch | None = None,
               shared: bool = True):  # fmt: skip
    """The registered op (what compiled decoding runs), or the launcher with launch-shape overrides."""
    if launch is None and score_launch is None:
        return lambda: torch.ops.longflow.decode_attention(*op_arguments(inputs, shared))
    settings = {**SETTINGS, "shared": shared}
    return lambda: decode_attention_triton(**inputs, **settings, launch=launch, score_launch=score_launch)


def step_call(inputs: dict, direct: bool = False):
    """The eager decode step the cache runs (`longflow_patch.ops.decode_step`), scratch kept;
    ``direct``: with direct launches of the compiled kernels (``LONGFLOW_DIRECT_LAUNCH``) after the
    first call, else every launch through Triton's JIT."""
    workspaces = {}

    def call():
        default, launch.DIRECT_LAUNCH = launch.DIRECT_LAUNCH, direct
        try:
            return decode_step(*op_arguments(inputs), workspaces=workspaces)
        finally:  # the setting the rest of the run (the throughput rows) uses
            launch.DIRECT_LAUNCH = default

    return call


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


def eager_overhead_rows(slots_list: list[int], batch: int = 1, rounds: int = 5) -> list[dict]:
    """Per-call cost of the op, the eager decode step and SDPA at ``batch``, in microseconds:
    ``*_event_us`` from CUDA events around one call (wall clock off the GPU), ``*_wall_us`` per
    call of 50 back-to-back calls, both the median over ``rounds`` rounds in which the four calls
    take turns (so a drift of the host's speed reaches all four alike); ``*_graph_us`` GPU time in
    a replayed CUDA graph."""
    rows = []
    for index, slots in enumerate(slots_list):
        inputs = make_inputs(batch, slots)
        calls = {"op": fused_call(inputs), "step": step_call(inputs), "direct": step_call(inputs, direct=True),
                 "sdpa": sdpa_call(inputs)}  # fmt: skip
        # A warm host first: in the H200 runs the first row (1k slots) came out 1.6x slower than
        # the next ones, SDPA aside.
        if index == 0:
            for call in calls.values():
                wall_ms_per_call(call, calls=500, repeats=1)
        row = {"batch": batch, "slots": slots, "rounds": rounds, **interleaved_call_us(calls, rounds)}
        for name, call in calls.items():
            row[f"{name}_graph_us"] = graph_median_ms(call) * 1e3 if torch.cuda.is_available() else None
        for clock in ("event", "wall"):
            row[f"step/sdpa {clock}"] = row[f"step_{clock}_us"] / row[f"sdpa_{clock}_us"]
            row[f"op/sdpa {clock}"] = row[f"op_{clock}_us"] / row[f"sdpa_{clock}_us"]
            row[f"direct/sdpa {clock}"] = row[f"direct_{clock}_us"] / row[f"sdpa_{clock}_us"]
        rows.append(row)
    return rows


EAGER_COLUMNS = ["batch", "slots", "op_event_us", "step_event_us", "direct_event_us", "sdpa_event_us",
                 "step/sdpa event", "direct/sdpa event", "op/sdpa event", "op_wall_us", "step_wall_us",
                 "direct_wall_us", "sdpa_wall_us", "step/sdpa wall", "direct/sdpa wall", "op/sdpa wall",
                 "step_graph_us", "sdpa_graph_us"]  # fmt: skip


def candidate_calls(batch: int, capacity: int, filled: int) -> dict:
    """One decode step's attention over a full cache of ``capacity`` slots holding ``filled`` tokens,
    by each candidate: the verify kernel with one query, SDPA over the filled slots, SDPA over all."""
    where, dtype = device(), torch.bfloat16
    q = torch.randn(batch, QUERY_HEADS, 1, HEAD_DIM, dtype=dtype, device=where)
    k = torch.randn(batch, KV_HEADS, capacity, HEAD_DIM, dtype=dtype, device=where)
    v = torch.randn_like(k)
    k_new, v_new = k[:, :, :1].clone(), v[:, :, :1].clone()
    length = torch.full((batch,), filled, dtype=torch.int32, device=where)
    verify = torch.ops.longflow.verify_attention
    return {
        "verify_t1": lambda: verify(q, k, v, length, k_new, v_new, None, HEAD_DIM**-0.5),
        "sdpa_filled": lambda: F.scaled_dot_product_attention(q, k[:, :, :filled], v[:, :, :filled], enable_gqa=True),
        "sdpa_capacity": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }


def candidate_rows(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """Attention time per call of full-cache decoding candidates, in microseconds (CUDA-graph
    replay on a GPU; the wall clock off it), at (batch, capacity, filled) shapes."""
    rows = []
    timer = graph_median_ms if torch.cuda.is_available() else median_ms
    for batch, capacity, filled in shapes:
        row = {"batch": batch, "capacity": capacity, "filled": filled}
        row.update({f"{name}_us": timer(call) * 1e3 for name, call in candidate_calls(batch, capacity, filled).items()})
        row["verify_t1/sdpa_filled"] = row["verify_t1_us"] / row["sdpa_filled_us"]
        rows.append(row)
    return rows


CANDIDATE_COLUMNS = ["batch", "capacity", "filled", "verify_t1_us", "sdpa_filled_us", "sdpa_capacity_us",
                     "verify_t1/sdpa_filled"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--slots", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--eager", action="store_true", help="only the batch-1 eager overhead table")
    parser.add_argument("--candidates", action="store_true", help="also time full-cache attention candidates")
    parser.add_argument("--sweep", action="store_true", help="time launch-shape variants of the attention pass")
    parser.add_argument("--sweep-capped", action="store_true",
                        help="with --sweep, only the default and the shapes with capped registers")  # fmt: skip
    parser.add_argument(
        "--score-sweep",
        action="store_true",
        help="time the scoring pass's launch shapes, shared and per-head eviction, side by side",
    )
    parser.add_argument("--profile", action="store_true", help="print GPU time per kernel (torch.profiler)")
    parser.add_argument("--preparation", choices=["none", "rope", "qwen3"], default="none",
                        help="the batch rows' and sweeps' new token: as it comes (none), or before RoPE (rope) "
                        "and Qwen3's q/k norms (qwen3), which the op applies")  # fmt: skip
    parser.add_argument("--out", default="bench/results/decode_op.json")
    args = common.parse_args_on_gpu(parser)
    import longflow_patch  # noqa: F401  (registers the op)

    bandwidth = copy_bandwidth_gbs()
    print(f"device copy bandwidth: {bandwidth:.0f} GB/s (read + write)")
    eager_rows = eager_overhead_rows(args.slots)
    print("\neager call at batch 1 (us; event: CUDA events around one call; wall: per call of 50 in a row)")
    print_table(eager_rows, EAGER_COLUMNS)
    candidates = candidate_rows(CANDIDATE_SHAPES) if args.candidates else []
    if candidates:
        print("\nfull-cache attention candidates (us per call, CUDA-graph replay)")
        print_table(candidates, CANDIDATE_COLUMNS)
    rows, sweep_rows, score_rows = [], [], []
    for batch, slots in itertools.product([] if args.eager else args.batches, args.slots):
        inputs = make_inputs(batch, slots, preparation=args.preparation)
        kv_bytes = 2 * inputs["k_cache"].numel() * inputs["k_cache"].element_size()
        row = {"batch": batch, "slots": slots, "floor_ms": kv_bytes / (bandwidth * 1e9) * 1e3}
        row["fused_graph_ms"] = graph_median_ms(fused_call(inputs))
        row["sdpa_graph_ms"] = graph_median_ms(sdpa_call(inputs))
        row["fused_eager_ms"] = median_ms(fused_call(inputs))
        row["step_eager_ms"] = median_ms(step_call(inputs))
        row["sdpa_eager_ms"] = median_ms(sdpa_call(inputs))
        row["fused/sdpa"] = row["fused_graph_ms"] / row["sdpa_graph_ms"]
        row["fused/floor"] = row["fused_graph_ms"] / row["floor_ms"]
        row["sdpa/floor"] = row["sdpa_graph_ms"] / row["floor_ms"]
        row["eager step/sdpa"] = row["step_eager_ms"] / row["sdpa_eager_ms"]
        rows.append(row)
        if args.profile:
            for name, call in (("fused", fused_call(inputs)), ("sdpa", sdpa_call(inputs))):
                times = kernel_times_us(call)
                row[f"{name}_kernels_us"] = times
                print(f"b={batch} s={slots} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
        if args.sweep:  # the default launch first: vs_default is against it
            default_ms = None
            for launch in ATTEND_LAUNCHES:
                if args.sweep_capped and launch != AttendLaunch() and not launch.max_registers:
                    continue
                try:
                    ms = graph_median_ms(fused_call(inputs, launch))
                except Exception as error:  # a shape Triton cannot fit (shared memory) is reported, not fatal
                    print(f"skip {launch}: {type(error).__name__}")
                    continue
                default_ms = default_ms or ms
                sweep_rows.append({"batch": batch, "slots": slots, **dataclasses.asdict(launch), "ms": ms,
                                   "vs_floor": ms / row["floor_ms"], "vs_default": ms / default_ms})  # fmt: skip
        if args.score_sweep:  # whole-step time; vs_default is against the first (default) launch
            sms = multiprocessor_count(torch.device("cuda"))
            for shared in (True, False):
                times = [graph_median_ms(fused_call(inputs, score_launch=launch, shared=shared))
                         for launch in SCORE_LAUNCHES]  # fmt: skip
                for launch, ms in zip(SCORE_LAUNCHES, times, strict=True):
                    plan = plan_decode(batch, KV_HEADS, QUERY_HEADS // KV_HEADS, slots, HEAD_DIM, sms, shared,
                                       score_launch=launch)  # fmt: skip
                    score_rows.append({"batch": batch, "slots": slots, "shared": shared, **dataclasses.asdict(launch),
                                       "tile_slots": plan.score_block, "chunks": plan.n_chunks, "ms": ms,
                                       "vs_default": ms / times[0]})  # fmt: skip
        del inputs
        torch.cuda.empty_cache()

    if sweep_rows:
        print("\nattention-pass launch sweep (whole op, ms; the default launch, then the best 3 per shape)")
        best = []
        for shape in sorted({(r["batch"], r["slots"]) for r in sweep_rows}):
            shape_rows = [r for r in sweep_rows if (r["batch"], r["slots"]) == shape]
            best += shape_rows[:1] + sorted(shape_rows[1:], key=lambda r: r["ms"])[:3]
        print_table(best, ["batch", "slots", "block_s", "num_warps", "num_stages", "min_tiles_per_split", "waves",
                           "max_registers", "ms", "vs_floor", "vs_default"])  # fmt: skip
    if score_rows:
        print("\nscoring-pass launch shapes (whole step, ms; tile_slots and chunks per scope as planned; "
              "vs_default: against the default launch)")  # fmt: skip
        print_table(score_rows, ["batch", "slots", "shared", "block", "num_warps", "tile_logits", "programs_per_sm",
                                 "tile_slots", "chunks", "ms", "vs_default"])  # fmt: skip
    if rows:
        print()
        columns = ["batch", "slots", "floor_ms", "sdpa_graph_ms", "fused_graph_ms", "fused/sdpa", "fused/floor",
                   "sdpa/floor", "fused_eager_ms", "step_eager_ms", "sdpa_eager_ms", "eager step/sdpa"]  # fmt: skip
        print_table(rows, columns)
    write_results(
        args.out,
        {
            "benchmark": "decode_op",
            "environment": environment(),
            "copy_bandwidth_gbs": bandwidth,
            "preparation": args.preparation,
            "shape": {"query_heads": QUERY_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
            "eager": eager_rows,
            "candidates": candidates,
            "rows": rows,
            "sweep": sweep_rows,
            "score_sweep": score_rows,
        },
    )


if __name__ == "__main__":
    main()
