"""End-to-end decode throughput: transformers' full-cache paths against LongFlow, eager and compiled.

Random-weight models of real shapes (weights do not change speed), bf16, a 512-token prompt and
outputs of 4k-32k tokens. Configurations, each at the largest batch whose weights plus KV cache
fit under ``--memory-cap-gb``:

1. ``default``: transformers' default, DynamicCache + SDPA, eager ``generate``;
2. ``static``: transformers' best full-cache path, static cache + ``torch.compile`` (CUDA graphs);
3. ``longflow``: LongFlow at 80% compression (budget = 20% of prompt + output), eager;
4. ``longflow-compiled``: the same, compiled + CUDA graphs (``apply(..., compile=True)``).

Method. A full 32k-token run of every configuration would take hours of GPU time, so each
configuration is timed on the real ``generate`` loop over ``--steps`` decode steps at the context
lengths that matter, and tokens/s over the whole output is integrated from those step times:
full caches are filled with random keys/values up to the context (their step time grows
linearly with it: measured at the start and the end of the output), LongFlow's step time does
not depend on the context (its cache is full-size from the first step). Step time is the
difference of two timed ``generate`` calls of different lengths, so prefill and set-up cancel.
The roofline of a step is (weight bytes + KV bytes read) over the measured copy bandwidth.

    python recipes/bench_throughput.py --shape qwen3-8b
    python recipes/plot_throughput.py bench/results/throughput_qwen3-8b.json
"""

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
import torch
from tqdm import tqdm
from transformers import DynamicCache, StaticCache, StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import longflow_patch
from longflow_patch.compat import cache_keyword
from longflow_patch.progress import TokenProgress

from common import SHAPES, build_model, copy_bandwidth_gbs, environment, print_table, write_results

CONFIGS = ("default", "static", "longflow", "longflow-compiled")


def kv_bytes_per_token(config) -> int:
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 2


def largest_batch(model, slots_per_sequence: int, cap_bytes: float, most: int) -> int:
    """Largest batch whose weights + KV cache + working memory (logits, activations) fit the cap."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    per_sequence = slots_per_sequence * kv_bytes_per_token(config)
    per_sequence += 512 * (config.intermediate_size * 2 * 2 + config.hidden_size * 8) + config.vocab_size * 8
    return max(1, min(most, int((cap_bytes - weights - 2 * 2**30) // per_sequence)))


def filled_cache(model, kind: str, batch: int, context: int, max_len: int):
    """A full cache holding ``context`` random tokens per sequence."""
    config = model.config
    cache = DynamicCache(config=config) if kind == "default" else StaticCache(config=config, max_cache_len=max_len)
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(shape, dtype=model.dtype, device=model.device)
        cache.update(keys, torch.randn_like(keys), layer)
    return cache


def timed_generate(model, batch: int, context: int, new_tokens: int, cache=None) -> float:
    ids = torch.randint(3, model.config.vocab_size, (batch, context + 1), device=model.device)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_keyword(model): cache},
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_seconds(model, kind: str, batch: int, context: int, max_len: int, steps: int) -> float:
    """Seconds per decode step of the real ``generate`` loop at ``context`` tokens."""
    if kind in ("default", "static"):
        static = filled_cache(model, "static", batch, context, max_len) if kind == "static" else None

        def run(new_tokens: int) -> float:
            if static is None:
                return timed_generate(
                    model, batch, context, new_tokens, filled_cache(model, "default", batch, context, max_len)
                )
            for layer in static.layers:
                layer.cumulative_length.fill_(context)
            return timed_generate(model, batch, context, new_tokens, static)
    else:

        def run(new_tokens: int) -> float:
            return timed_generate(model, batch, context, new_tokens)

    run(steps)  # warm-up: compilation and CUDA-graph capture happen here
    short, long = run(steps // 4), run(steps)
    return (long - short) / (steps - steps // 4)


def release(model) -> None:
    """Drop compiled graphs, CUDA-graph pools and cached blocks between configurations."""
    longflow_patch.unapply(model)
    model.__dict__.pop("_compiled_call", None)
    torch._dynamo.reset()
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def measure_largest(model, kind: str, prompt: int, output: int, cap: float, steps: int, bandwidth: float) -> dict:
    """`measure` at the estimated largest batch, stepping the batch down by 20% on out-of-memory."""
    slots = (prompt + output) // 5 if kind.startswith("longflow") else prompt + output
    batch = largest_batch(model, slots, cap, most=256)
    while True:
        try:
            return measure(model, kind, prompt, output, batch, steps, bandwidth)
        except torch.OutOfMemoryError:
            release(model)
            if batch == 1:
                raise
            batch = max(1, int(batch * 0.8))
            tqdm.write(f"{kind}: out of memory, retrying at batch {batch}")
        finally:
            release(model)


def measure(model, kind: str, prompt: int, output: int, batch: int, steps: int, bandwidth: float) -> dict:
    config = model.config
    total = prompt + output
    budget = (prompt + output) // 5
    compressed = kind.startswith("longflow")
    model.generation_config.compile_config = None  # transformers' default for the static cache: reduce-overhead
    if compressed:
        longflow_patch.apply(model, policy="longflow", budget=budget, compile=kind == "longflow-compiled")
        context = prompt  # the cache is budget-sized from the first step: the context does not matter
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if compressed:
        first = last = step_seconds(model, kind, batch, context, total, steps)
    elif kind == "static":
        first = last = step_seconds(model, kind, batch, prompt + output // 2, total, steps)  # reads all slots
    else:
        first = step_seconds(model, kind, batch, prompt, total, steps)
        last = step_seconds(model, kind, batch, total - steps, total, steps)
    mean_step = (first + last) / 2
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = budget if compressed else (total if kind == "static" else prompt + output / 2)
    roofline = (weight_bytes + batch * slots * kv_bytes_per_token(config)) / (bandwidth * 1e9)
    peak = torch.cuda.max_memory_allocated() / 2**30 if model.device.type == "cuda" else 0.0
    return {
        "config": kind, "output": output, "batch": batch, "budget": budget if compressed else None,
        "step_ms_first": first * 1e3, "step_ms_last": last * 1e3, "step_ms_mean": mean_step * 1e3,
        "tokens_per_s": batch / mean_step, "peak_gib": peak, "roofline_ms": roofline * 1e3,
        "vs_roofline": mean_step / roofline,
    }  # fmt: skip


def memory_trace(model, batch: int, budget: int, prompt: int, output: int, every: int) -> list[dict]:
    """GPU memory in use while one compiled LongFlow ``generate`` writes ``output`` tokens at a fixed
    budget, sampled every ``every`` tokens, beside the memory of a full cache filled to the same
    length (a DynamicCache holding the same tokens, measured the same way)."""
    samples: list[dict] = []

    class Sampler(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            generated = input_ids.shape[1] - prompt
            if generated % every == 0:
                samples.append({"tokens": prompt + generated, "longflow_gib": torch.cuda.memory_allocated() / 2**30})
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    release(model)
    base = torch.cuda.memory_allocated()
    longflow_patch.apply(model, policy="longflow", budget=budget, compile=True)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=model.device)
    with tqdm(total=batch * output, desc="memory trace", unit="tok", unit_scale=True) as bar:
        watchers = StoppingCriteriaList([Sampler(), TokenProgress(bar)])
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=output, min_new_tokens=output,
                       do_sample=False, stopping_criteria=watchers)  # fmt: skip
    release(model)
    for sample in samples:
        cache = filled_cache(model, "default", batch, sample["tokens"], sample["tokens"])
        sample["full_cache_gib"] = torch.cuda.memory_allocated() / 2**30
        sample["longflow_gib"] -= base / 2**30
        sample["full_cache_gib"] -= base / 2**30
        del cache
        torch.cuda.empty_cache()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--outputs", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--memory-cap-gb", type=float, default=70.0)
    parser.add_argument("--steps", type=int, default=48, help="decode steps per timed generate call")
    parser.add_argument(
        "--memory-trace",
        type=int,
        nargs=2,
        metavar=("BATCH", "BUDGET"),
        default=None,
        help="also trace memory during one long compiled LongFlow generation at a fixed budget",
    )
    parser.add_argument("--trace-output", type=int, default=None,
                        help="tokens the memory trace generates (default: the longest output)")  # fmt: skip
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/throughput_<shape>.json)")
    args = parser.parse_args()

    # Each configuration compiles at most twice over the output lengths (static, then dynamic shapes).
    torch._dynamo.config.recompile_limit = 64
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth_gbs() if device == "cuda" else 50.0
    model = build_model(args.shape, device)
    out = Path(args.out or f"bench/results/throughput_{args.shape}.json")
    earlier = json.loads(out.read_text()) if out.exists() else {}
    if earlier.get("prompt") != args.prompt or earlier.get("memory_cap_gb") != args.memory_cap_gb:
        earlier = {}
    # Rows of earlier runs with the same settings stay unless re-measured here.
    rows = [row for row in earlier.get("rows", []) if (row["output"], row["config"]) not in
            {(output, kind) for output in args.outputs for kind in args.configs}]  # fmt: skip
    settings = {"benchmark": "throughput", "environment": environment(), "shape": args.shape,
                "model": SHAPES[args.shape], "prompt": args.prompt, "memory_cap_gb": args.memory_cap_gb,
                "steps": args.steps, "copy_bandwidth_gbs": bandwidth}  # fmt: skip
    for output in tqdm(args.outputs, desc="output lengths"):
        for kind in args.configs:
            row = measure_largest(model, kind, args.prompt, output, args.memory_cap_gb * 1e9, args.steps, bandwidth)
            rows.append(row)
            tqdm.write(f"{kind:>18} out={output:>6} batch={row['batch']:>3} {row['tokens_per_s']:9.1f} tok/s")
            add_ratios(rows)
            write_results(out, {**earlier, **settings, "rows": rows})  # a cut-off run keeps its rows
    trace = []
    if args.memory_trace and device == "cuda":
        batch, budget = args.memory_trace
        length = args.trace_output or max(args.outputs)
        trace = memory_trace(model, batch, budget, args.prompt, length, every=length // 16)
        print_table(trace, ["tokens", "longflow_gib", "full_cache_gib"])
    if trace:
        earlier.update(memory_trace=trace, memory_trace_settings=[*args.memory_trace, length])
    rows.sort(key=lambda row: (row["output"], CONFIGS.index(row["config"])))
    print()
    print_table(rows, ["config", "output", "batch", "budget", "step_ms_first", "step_ms_last", "tokens_per_s",
                       "x_default", "x_static", "peak_gib", "roofline_ms", "vs_roofline"])  # fmt: skip
    write_results(out, {**earlier, **settings, "rows": rows})


def add_ratios(rows: list[dict]) -> None:
    """Each row's tokens/s over the default's and the static cache's at the same output length."""
    for row in rows:
        same = {r["config"]: r for r in rows if r["output"] == row["output"]}
        for base in ("default", "static"):
            if base in same:
                row[f"x_{base}"] = row["tokens_per_s"] / same[base]["tokens_per_s"]


if __name__ == "__main__":
    main()
