"""The speed measurements of issue 29 in one run on one GPU (about 7 minutes on an H200).

    python3 bench/speed_suite.py            # on the GPU; results under bench/results/
    python bench/speed_suite.py --smoke     # tiny shapes on the CPU: every part end to end

Parts, each writing its results as soon as it finishes (a run cut short keeps what came before):

a. ``speed_eager_op.json``: the eager per-call cost of the fused op at batch 1 (the registered op,
   the eager decode step the cache calls, the same with direct launches of the compiled kernels,
   SDPA; CUDA events around one call and wall clock over 50 calls in a row, medians over rounds in
   which the four take turns) and the full-cache attention candidates (`bench/decode_op.py`).
b. ``throughput_<shape>_<tag>.json`` and ``.png``: end-to-end tokens/s at outputs of 4k-32k:
   the strongest full-cache baseline (compiled static-shape loop over the GQA split-K kernel
   reading only the filled positions), LongFlow with `apply`'s defaults (compiled on one GPU;
   its one-time compile cost), LongFlow eager, transformers' default, and transformers' static
   cache if time is left, with the full cache's roofline (`recipes/bench_throughput.py`).
c. ``profile_step_<shape>_<tag>.json``: where a compiled LongFlow decode step's time goes
   (torch.profiler), at the rows named by ``--profile-outputs`` (`bench/profile_step.py`),
   taken right after their throughput row, while its graphs are warm.

A row whose estimated cost would overrun ``--budget-s`` is skipped and recorded as skipped. The
last thing printed is a short table of all three parts.
"""

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import longflow_patch

import bench_throughput as throughput
import decode_op
import plot_throughput
import profile_step
from common import SHAPES, build_model, copy_bandwidth_gbs, environment, print_table, write_results

ROOT = Path(__file__).resolve().parents[1]

SMOKE = dict(shape="tiny", prompt=32, timing_prompt=8, outputs=[64, 128], steps=8, max_batch=3, backend="eager",
             eager_slots=[64, 128], eager_rounds=1, candidates=[(2, 256, 100)], profile_outputs=[64])  # fmt: skip


def device_tag(name: str) -> str:
    """The card's model in a device name, lower case ("NVIDIA H100 80GB HBM3": "h100"), else its last word."""
    model = re.search(r"\b[A-Z]+\d+[A-Z]*\b", name.removeprefix("NVIDIA "))
    return (model.group() if model else name.split()[-1]).lower()


def eager_part(slots: list[int], rounds: int, candidates: list[tuple[int, int, int]], out: Path) -> dict:
    """Part a: the batch-1 eager overhead table (medians over ``rounds`` interleaved rounds) and the
    full-cache attention candidates."""
    bandwidth = copy_bandwidth_gbs() if torch.cuda.is_available() else None
    result = {"benchmark": "decode_op --eager --candidates", "environment": environment(),
              "copy_bandwidth_gbs": bandwidth, "eager": decode_op.eager_overhead_rows(slots, 1, rounds)}  # fmt: skip
    write_results(out, result)
    result["candidates"] = decode_op.candidate_rows(candidates)
    write_results(out, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput.add_arguments(parser)
    # The outputs that matter most first (the target is at 8k-32k; each compiles compiled LongFlow
    # for its shape).
    parser.set_defaults(outputs=[8192, 32768, 16384, 4096], steps=32)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (or GPU), a few seconds a part")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-time budget of the whole run")
    parser.add_argument("--eager-slots", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--eager-rounds", type=int, default=5, help="interleaved rounds of the eager table")
    parser.add_argument("--profile-outputs", type=int, nargs="*", default=[8192, 16384],
                        help="outputs whose compiled LongFlow row is profiled (8B: batch 171, 95)")  # fmt: skip
    parser.add_argument("--tag", default=None, help="results name suffix (default: the device, e.g. h200)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default bench/results (smoke: a temp folder)")
    args = parser.parse_args()
    start = time.time()
    candidates = decode_op.CANDIDATE_SHAPES
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
        candidates = SMOKE["candidates"]
        args.configs = list(throughput.CONFIGS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tag = args.tag or (device_tag(torch.cuda.get_device_name()) if device == "cuda" else "cpu")
    out_dir = args.out_dir or (Path("/tmp/speed_suite_smoke") if args.smoke else ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)

    # a. eager per-call cost
    eager = eager_part(args.eager_slots, args.eager_rounds, candidates, out_dir / f"speed_eager_op_{tag}.json")
    print(f"[{time.time() - start:.0f} s] part a done")

    # b. throughput (and c. profiles, taken after their rows)
    bandwidth = copy_bandwidth_gbs() if device == "cuda" else 50.0
    model = build_model(args.shape, device)
    results = out_dir / f"throughput_{args.shape}_{tag}.json"
    profiles_path = out_dir / f"profile_step_{args.shape}_{tag}.json"
    settings = {"benchmark": "throughput (speed_suite)", "environment": environment(), "shape": args.shape,
                "model": SHAPES[args.shape], "prompt": args.prompt, "timing_prompt": args.timing_prompt,
                "memory_cap_gb": args.memory_cap_gb, "steps": args.steps, "compile_shapes": args.compile_shapes,
                "copy_bandwidth_gbs": bandwidth, "roofline_accounting": throughput.ROOFLINE_ACCOUNTING,
                "labels": throughput.LABELS}  # fmt: skip
    profiles: list[dict] = []
    deadline = start + args.budget_s - 15  # leave time for the plot and the summary

    def write(rows: list[dict], rooflines: dict) -> None:
        write_results(results, {**settings, "full_cache_roofline": rooflines, "rows": rows})

    def profile_after(row: dict) -> None:
        if row["config"] != "longflow-compiled" or row["output"] not in args.profile_outputs:
            return
        if time.time() + 45 > deadline:
            print(f"profile at output {row['output']} skipped (time)")
            return
        profiles.append(profile_row(model, row, args, bandwidth))
        write_results(profiles_path, {"benchmark": "profile_step (speed_suite)", "environment": environment(),
                                      "copy_bandwidth_gbs": bandwidth, "profiles": profiles})  # fmt: skip

    rows, rooflines = throughput.run_rows(model, args, bandwidth, write, deadline, profile_after)
    print(f"[{time.time() - start:.0f} s] parts b and c done")
    if any("tokens_per_s" in row for row in rows):
        plot_throughput.plot(results)
    summary(eager, rows, rooflines, profiles)
    print(f"[{time.time() - start:.0f} s] done")


def profile_row(model, row: dict, args, bandwidth: float) -> dict:
    """Part c for one compiled LongFlow row: apply it again (same shape: the compiled step is
    reused; new cache addresses: one CUDA-graph capture) and profile two generate calls."""
    longflow_patch.apply(model, policy="longflow", budget=row["budget"])
    ids = torch.randint(3, model.config.vocab_size, (row["batch"], args.timing_prompt + 1), device=model.device)

    def generate(new_tokens: int) -> None:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)  # fmt: skip

    try:
        short, long = max(2, args.steps // 6), max(4, args.steps // 2)
        generate(long)  # capture
        roofline = profile_step.roofline_parts(model, row["batch"], row["budget"], bandwidth)
        result = profile_step.profile_generate_step(generate, short, long, row["step_ms_mean"], roofline)
    finally:
        throughput.release(model)
    profile_step.print_profile(result)
    return {"output": row["output"], "batch": row["batch"], "budget": row["budget"], "steps": [short, long], **result}


def readme_table(rows: list[dict], rooflines: dict) -> str:
    """The README's throughput table in Markdown: per output length, LongFlow's ratio to the
    strongest full-cache baseline first, then the other ratios, each labelled for what it compares."""

    def measured(config: str, output: int) -> dict:
        return next((r for r in rows if r["config"] == config and r["output"] == output and "tokens_per_s" in r), {})

    def speed(row: dict) -> str:
        return f"{row['tokens_per_s']:,.0f} (b={row['batch']})" if row else "not measured"

    def times(row: dict, key: str) -> str:
        return f"{row[key]:.2f}x" if key in row else "-"

    lines = [
        "| output | LongFlow / strongest full cache | LongFlow / full cache at its roofline | LongFlow step / its "
        "own roofline | LongFlow, apply's default (compiled) | strongest full cache (compiled loop) | full cache at "
        "its roofline | LongFlow eager | transformers default | transformers static + compile |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for output in sorted(rooflines):
        longflow, roof = measured("longflow-compiled", output), rooflines[output]
        label = f"{output // 1024}k" if output >= 1024 else str(output)
        cells = [label, f"**{times(longflow, 'x_strongest')}**", times(longflow, "x_full_roofline"),
                 times(longflow, "vs_roofline"), speed(longflow), speed(measured("fullcache-loop", output)),
                 speed(roof), speed(measured("longflow", output)), speed(measured("default", output)),
                 speed(measured("static", output))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(eager: dict, rows: list[dict], rooflines: dict, profiles: list[dict]) -> None:
    print("\n=== a. eager call at batch 1 (us; event: CUDA events around one call; wall: 50 calls in a row) ===")
    print_table(eager["eager"], ["slots", "step_event_us", "direct_event_us", "sdpa_event_us", "step/sdpa event",
                                 "direct/sdpa event", "step_wall_us", "direct_wall_us", "sdpa_wall_us",
                                 "step/sdpa wall", "direct/sdpa wall", "op_event_us", "op/sdpa event"])  # fmt: skip
    print("\nfull-cache attention candidates (us per call)")
    print_table(eager["candidates"], decode_op.CANDIDATE_COLUMNS)
    print(
        "\n=== b. tokens/s (x_strongest: over the compiled full-cache loop; x_full_roofline: over the full cache "
        "at its roofline; vs_roofline: the row's step over its own roofline; vs_floor: over its floor with the "
        "matmuls' arithmetic counted) ==="
    )
    print_table([row for row in rows if "tokens_per_s" in row], throughput.COLUMNS)
    print_table([{"output": output, **roofline} for output, roofline in rooflines.items()],
                ["output", "batch", "step_ms", "tokens_per_s"])  # fmt: skip
    skipped = [f"{row['config']}@{row['output']}: {row.get('skipped') or row.get('error')}" for row in rows
               if "tokens_per_s" not in row]  # fmt: skip
    if skipped:
        print("not measured: " + "; ".join(skipped))
    print("\nREADME table (tokens/s at the largest batch b under the memory cap):")
    print(readme_table(rows, rooflines))
    for profile in profiles:
        print(
            f"\n=== c. compiled LongFlow step, output {profile['output']}, batch {profile['batch']}, budget "
            f"{profile['budget']}: {profile['step_ms']:.2f} ms ==="
        )
        print_table(profile["groups"], ["group", "ms_per_step", "share_of_step", "roofline_ms"])


if __name__ == "__main__":
    main()
