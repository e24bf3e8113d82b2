"""Plot a throughput results file: tokens/s and peak memory against output length, per configuration
(with the full cache's roofline when the file has it), and the memory trace when it has one.

python recipes/plot_throughput.py bench/results/throughput_qwen3-8b.json [--out FILE.png]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(results: Path, out: Path | None = None) -> Path:
    """Write the figure of ``results`` (a `bench_throughput` JSON) to ``out`` (default: beside it)."""
    data = json.loads(results.read_text())
    measured = [row for row in data["rows"] if "tokens_per_s" in row]  # skipped or failed rows carry no times
    trace = data.get("memory_trace") or []
    figure, axes = plt.subplots(1, 3 if trace else 2, figsize=(16 if trace else 11, 4.2))
    speed, memory = axes[:2]
    for config in dict.fromkeys(row["config"] for row in measured):
        rows = sorted((r for r in measured if r["config"] == config), key=lambda r: r["output"])
        outputs = [r["output"] for r in rows]
        speed.plot(outputs, [r["tokens_per_s"] for r in rows], marker="o", label=config)
        memory.plot(outputs, [r["peak_gib"] / r["batch"] for r in rows], marker="o", label=config)
    roofline = data.get("full_cache_roofline") or {}
    if roofline:
        outputs = sorted(roofline, key=int)
        speed.plot([int(o) for o in outputs], [roofline[o]["tokens_per_s"] for o in outputs], linestyle="--",
                   color="gray", label="full cache at its roofline")  # fmt: skip
    for axis, title in ((speed, "decode throughput (largest batch under the cap)"),
                        (memory, "peak GPU memory per sequence")):  # fmt: skip
        axis.set_xscale("log", base=2)
        axis.set_xlabel("output tokens")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    if trace:
        batch, budget = data["memory_trace_settings"][:2]
        tokens = [t["tokens"] for t in trace]
        axes[2].plot(tokens, [t["full_cache_gib"] for t in trace], marker="o", label="full cache (DynamicCache)")
        axes[2].plot(tokens, [t["longflow_gib"] for t in trace], marker="o", label=f"LongFlow, budget {budget}")
        axes[2].set_title(f"GPU memory during one generation (batch {batch})", fontsize=10)
        axes[2].set_xlabel("sequence length (tokens)")
        axes[2].set_ylabel("GiB above the weights")
        axes[2].grid(alpha=0.3)
        axes[2].legend()
    speed.set_ylabel("tokens / s")
    speed.set_yscale("log")
    memory.set_ylabel("GiB per sequence")
    speed.legend(fontsize=8)
    environment = data["environment"]
    figure.suptitle(f"{data['shape']} shape, prompt {data['prompt']}, {environment['device']}", fontsize=11)
    figure.tight_layout()
    out = out or results.with_suffix(".png")
    figure.savefig(out, dpi=120)
    plt.close(figure)
    print(f"wrote {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the JSON)")
    args = parser.parse_args()
    plot(args.results, args.out)


if __name__ == "__main__":
    main()
