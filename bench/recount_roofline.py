"""A committed throughput run's rooflines, recounted with today's accounting of a step's bytes.

Until 2026-12-07 a step's roofline counted the bytes of every weight, the input embedding's whole
table too (1.2 GB of Qwen3-8B's 16.4 GB: 0.41 ms of an H100 step), though a step reads only its
tokens' rows of it. `common.step_read_bytes` counts what a step must read. A run's step times do
not depend on that, so its rooflines can be recounted from its JSON alone: the shape's weights
(counted on the meta device), each row's batch and slots, and the copy bandwidth the run measured.

    python bench/recount_roofline.py bench/results/throughput_qwen3-8b_h100_fp16_logits.json
    python bench/recount_roofline.py FILE --write   # store them in FILE, the earlier ones kept beside

Prints, per measured row, the roofline and the step's ratio to it as the run counted and now, and
each row's tokens/s over the full cache at its roofline (``x_full_roofline``), now.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import bench_throughput as throughput
from common import SHAPES, print_table

EARLIER = "_counting_embedding_table"
"""Suffix of the fields that keep a recounted run's own figures."""


def meta_model(shape: str) -> Qwen3ForCausalLM:
    """``shape``'s model (`common.SHAPES`) in bf16 on the meta device: its weights' sizes, no memory."""
    with torch.device("meta"):
        return Qwen3ForCausalLM(Qwen3Config(**SHAPES[shape])).to(torch.bfloat16)


def recount(payload: dict) -> dict:
    """``payload`` (a `recipes/bench_throughput.py` or `bench/speed_suite.py` throughput JSON) with
    each measured row's ``roofline_ms``, ``vs_roofline`` and ``x_full_roofline``, and the full
    cache's rooflines, counted by `common.step_read_bytes`. Fields the run wrote under an older
    accounting are kept beside, with the suffix `EARLIER` (once: recounting again changes nothing)."""
    payload = copy.deepcopy(payload)
    if payload.get("roofline_accounting") == throughput.ROOFLINE_ACCOUNTING:
        return payload
    model = meta_model(payload["shape"])
    bandwidth, prompt = payload["copy_bandwidth_gbs"], payload["prompt"]
    full = {
        int(output): throughput.full_cache_at_roofline(model, roofline["batch"], prompt, int(output), bandwidth)
        for output, roofline in payload["full_cache_roofline"].items()
    }
    for row in payload["rows"]:
        if "tokens_per_s" not in row:
            continue
        for key in ("roofline_ms", "vs_roofline", "x_full_roofline"):
            if key in row:
                row[key + EARLIER] = row[key]
        slots = throughput.slots_read(row["config"], prompt, row["output"])
        roofline = throughput.roofline_seconds(model, row["batch"], slots, bandwidth)
        row["roofline_ms"], row["vs_roofline"] = roofline * 1e3, row["step_ms_mean"] * 1e-3 / roofline
    throughput.add_ratios(payload["rows"], full)
    payload["full_cache_roofline" + EARLIER] = payload["full_cache_roofline"]
    payload["full_cache_roofline"] = {str(output): roofline for output, roofline in full.items()}
    payload["roofline_accounting"] = throughput.ROOFLINE_ACCOUNTING
    payload["roofline_recounted_by"] = "bench/recount_roofline.py"
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="throughput JSON files")
    parser.add_argument("--write", action="store_true", help="store the recounted figures in each file")
    args = parser.parse_args(argv)
    for path in map(Path, args.results):
        before = json.loads(path.read_text())
        after = recount(before)
        print(f"\n{path} ({after['shape']}, {after['copy_bandwidth_gbs']:.0f} GB/s)")
        rows = [
            {"config": row["config"], "output": row["output"], "batch": row["batch"], "step_ms": row["step_ms_mean"],
             "roofline_ms_then": row.get("roofline_ms" + EARLIER, row["roofline_ms"]),
             "roofline_ms": row["roofline_ms"],
             "vs_roofline_then": row.get("vs_roofline" + EARLIER, row["vs_roofline"]),
             "vs_roofline": row["vs_roofline"], "x_full_roofline": row.get("x_full_roofline")}
            for row in after["rows"] if "tokens_per_s" in row
        ]  # fmt: skip
        print_table(rows, list(rows[0]) if rows else ["config"])
        if args.write:
            path.write_text(json.dumps(after, indent=2) + "\n")
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
