"""Accuracy and fidelity against KV budget for every policy, on the bundled toy reasoner.

For each policy and budget: greedy accuracy on fresh problems (one batched ``generate``, Wilson
95% interval), and the mean KL divergence of the policy's next-token distribution from the full
cache's, teacher-forced on the full cache's own traces (one forward over the whole trace: the
patched attention runs the fused decode step token by token inside it, so this is exactly
sequential decoding with eviction). Budgets are given as slots (``256``) or as a percentage of the
mean full-cache trace length (``10%``). Results: JSON rows plus a PNG plot beside it.

``--tables`` adds hand-set per-head allocations over R-KV (buffer 16), to bound what any allocation
can do: ``4:whole/128`` keeps every KV head of layer 4 whole (it never evicts) and every other head
at 128 slots (a few one more, for a whole average); ``4:256/102`` is an average of 128.

    python recipes/eval_accuracy.py --problems 400 --out bench/results/accuracy_toy.json
    python recipes/eval_accuracy.py --problems 4 --policies longflow --budgets 20% --blocks 1 1   # smoke

``--pool`` adds up results files measured on different problem sets (other seeds) and tests each
policy against a baseline: where accuracies are a few problems in a thousand, one set of 400 cannot
tell them apart.

    python recipes/eval_accuracy.py --pool bench/results/accuracy_toy_tight/seed*.json --out pooled.json
"""

import argparse
import ast
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_budgets import fixed_table_policy, held_table

import longflow_patch
from longflow_patch import toy
from longflow_patch.fidelity import mean_kl, trace_log_probs

from common import environment, print_table, write_results

DEFAULT_BUDGETS = ["5%", "10%", "20%", "40%", "128", "256", "512"]
COMPARED = ["longflow", "streamingllm", "h2o", "snapkv", "rkv", "random", "lukv+longflow", "reasonalloc+longflow",
            "lukv+rkv", "reasonalloc+rkv"]  # fmt: skip
PROFILED = ("lukv", "reasonalloc")
TABLE_BUFFER = 16  # R-KV's re-selection buffer in the hand-set tables of --tables
# A policy is a registered name, an allocator over a token scorer ("lukv+rkv": LU-KV's budgets over
# R-KV), a uniform policy evicting per KV head ("rkv:per_head", the uniform baseline of an allocator),
# an allocator whose layer's heads share eviction ("lukv+rkv:shared": layer-wise budgets only), or
# ReasonAlloc without its online step ("reasonalloc+rkv:static": the pre-allocated split, fixed); any of
# them with policy fields set ("lukv+longflow:shared@floor_share=0.9").
ALLOCATORS = [f"{a}+{s}" for a in PROFILED for s in longflow_patch.SCORERS]
CHOICES = (sorted(longflow_patch.POLICIES) + ALLOCATORS + [f"{spec}:shared" for spec in [*PROFILED, *ALLOCATORS]]
           + [f"{spec}:static" for spec in [*PROFILED, *ALLOCATORS] if spec.startswith("reasonalloc")]
           + [f"{name}:per_head" for name in sorted(longflow_patch.POLICIES) if name not in PROFILED])  # fmt: skip


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    center = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, center - half), min(1.0, center + half)


def split_settings(spec: str) -> tuple[str, dict[str, object]]:
    """``SPEC@field=value@...`` as (SPEC, {field: value}), values Python literals; ValueError
    naming a setting that is not one."""
    base, *settings = spec.split("@")
    parsed = {}
    for setting in settings:
        field, equals, value = setting.partition("=")
        try:
            if not (field.isidentifier() and equals):
                raise ValueError
            parsed[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{setting!r} in {spec!r} is not FIELD=VALUE (a Python literal)") from None
    return base, parsed


def policy_spec(spec: str) -> str:
    """``spec`` checked for the command line: one of ``CHOICES``, then any ``@field=value``."""
    try:
        base, _ = split_settings(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if base not in CHOICES:
        raise argparse.ArgumentTypeError(f"unknown policy {base!r}; choose from {', '.join(CHOICES)}")
    return spec


def make_policy(
    spec: str, budget: int, profiles: Callable[[str], Sequence[Path]] = toy.profile_paths
) -> longflow_patch.Policy:
    """The policy named by ``spec`` (``name``, ``allocator+scorer``, ``name:per_head``,
    ``allocator:shared`` or ``reasonalloc[+scorer]:static``, then any ``@field=value``) at a budget:
    compacting scorers get a buffer of an eighth of it, the allocators the profiles
    ``profiles(method)`` (default: the toy reasoner's bundled ones; each solves with the one nearest
    its budget) and, without ``+scorer``, the scorer those were measured under."""
    spec, fields = split_settings(spec)
    spec, _, eviction = spec.partition(":")
    name, _, scorer = spec.partition("+")
    settings: dict[str, object] = {"budget": budget}
    if eviction == "static":
        settings["online"] = False
    elif eviction:
        settings["per_head"] = eviction == "per_head"
    # An allocator without "+scorer" runs over its profiles' scorer (R-KV for the toy's), so it gets the buffer too.
    if name in PROFILED or issubclass(longflow_patch.POLICIES[scorer or name], longflow_patch.CompactingPolicy):
        settings["buffer"] = max(8, budget // 8)
    if name in PROFILED:
        settings["profile"] = tuple(profiles(name))
        if scorer:  # else the scorer the profiles were measured under
            settings["scorer"] = scorer
    return longflow_patch.make_policy(name, **settings | fields)


def table_policy(spec: str, whole: int, folder: Path) -> longflow_patch.Policy:
    """LU-KV over R-KV (buffer ``TABLE_BUFFER``) keeping exactly the hand-set table ``spec``
    (``LAYER:BUDGET/REST``, ``whole`` for ``whole`` slots), its profile written into ``folder``."""
    config = toy.model_config()
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    layer, _, budgets = spec.partition(":")
    held, others = (whole if text == "whole" else int(text) for text in budgets.split("/"))
    table = held_table(layers, kv_heads, {(int(layer), head): held for head in range(kv_heads)}, others)
    return fixed_table_policy(table, "rkv", TABLE_BUFFER, folder / f"table {spec.replace('/', ' ')}.json")


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    completions = []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        completions += tokenizer.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    return completions


def reference_completions(model, tokenizer, problems: list[dict], longest: int, args, device: str) -> list[str]:
    """Full-cache greedy completions: policy ``full`` (the same op, no eviction; compiled on a GPU),
    read from ``--reference`` when that file holds them for these problems, else generated (and
    written there), so parallel runs over different policies share one reference."""
    path, key = args.reference, {"problems": args.problems, "seed": args.seed, "blocks": args.blocks}
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            return saved["completions"]
    prompts = [p["prompt"] for p in problems]
    longflow_patch.apply(model, policy="full", compile=device == "cuda" and not args.no_compile)
    completions = generate(model, tokenizer, prompts, longest, args.batch_size)
    release(model)
    if path is not None:
        write(path, {"key": key, "completions": completions})
    return completions


def release(model) -> None:
    """Unpatch ``model`` and drop its compiled step, so the next policy starts clean."""
    longflow_patch.unapply(model)
    model.__dict__.pop("_compiled_call", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=400)
    parser.add_argument("--seed", type=int, default=20261122, help="problem seed (fresh: not the training seeds)")
    parser.add_argument("--policies", nargs="*", default=COMPARED, type=policy_spec,
                        help="SPEC[@FIELD=VALUE...], SPEC one of: " + ", ".join(CHOICES))  # fmt: skip
    parser.add_argument("--budgets", nargs="+", default=DEFAULT_BUDGETS)
    parser.add_argument("--tables", nargs="*", default=[], help="hand-set allocations LAYER:BUDGET/REST")
    parser.add_argument("--kl-problems", type=int, default=32, help="traces used for the KL fidelity metric")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--blocks", type=int, nargs=2, default=[2, 6], help="problem length range (blocks)")
    parser.add_argument("--no-compile", action="store_true", help="decode eagerly even on a GPU")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="model dtype (default: bfloat16 on a GPU, float32 on CPU)")  # fmt: skip
    parser.add_argument(
        "--out",
        default=None,
        help="results JSON (default bench/results/accuracy_toy.json; "
        "--merge and --pool need it, so a committed file is never overwritten by accident)",
    )
    parser.add_argument("--reference", type=Path, default=None,
                        help="full-cache completions shared by parallel runs (read if they match)")  # fmt: skip
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="only merge these result files (runs split by policy) into --out")  # fmt: skip
    parser.add_argument("--describe", default=None,
                        help="with --merge: history entry (say, the command) for files that record none")  # fmt: skip
    parser.add_argument("--pool", nargs="+", type=Path, default=None,
                        help="only pool these result files (other problem sets) into --out")  # fmt: skip
    parser.add_argument("--baseline", default="longflow", help="with --pool: the policy each one is tested against")
    args = parser.parse_args()
    if (args.merge or args.pool) and args.out is None:
        parser.error("--merge and --pool need --out")
    if args.merge:
        merge(args.merge, Path(args.out), args.describe)
        return
    if args.pool:
        pool(args.pool, Path(args.out), args.baseline)
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(toy.model_path(), padding_side="left")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(toy.model_path(), dtype=dtype).to(device).eval()
    problems = toy.make_problems(args.problems, args.seed, blocks=tuple(args.blocks), with_solution=True)
    prompts = [p["prompt"] for p in problems]
    longest = max(len(tokenizer(p["prompt"] + p["solution"]).input_ids) for p in problems) + 16

    started = time.perf_counter()
    reference = reference_completions(model, tokenizer, problems, longest, args, device)
    full_correct = sum(toy.is_correct(c, p["answer"]) for c, p in zip(reference, problems, strict=True))
    full_blocks = mean_blocks_solved(reference, problems)
    trace_tokens = [len(tokenizer(c).input_ids) for c in reference]
    mean_trace = sum(trace_tokens) / len(trace_tokens)
    print(f"full cache: {full_correct}/{len(problems)} correct, mean trace {mean_trace:.0f} tokens "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    kl_prompts, kl_traces = prompts[: args.kl_problems], reference[: args.kl_problems]
    with torch.no_grad():
        full_log_probs, kl_mask = trace_log_probs(model, tokenizer, kl_prompts, kl_traces)

    rows = [{"policy": "full", "budget_label": "full", "budget": None, "accuracy": full_correct / len(problems),
             "ci": wilson_interval(full_correct, len(problems)), "blocks_solved": full_blocks, "kl": 0.0,
             "compiled": device == "cuda" and not args.no_compile}]  # fmt: skip
    out = Path(args.out or "bench/results/accuracy_toy.json")
    header = {"benchmark": "accuracy_toy", "environment": environment(), "problems": args.problems,
              "seed": args.seed, "blocks": args.blocks, "mean_trace_tokens": mean_trace,
              "kl_problems": len(kl_prompts), "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    budgets = {label: round(float(label[:-1]) / 100 * mean_trace) if label.endswith("%") else int(label)
               for label in args.budgets}  # fmt: skip
    whole = len(tokenizer(prompts, padding=True).input_ids[0]) + longest + TABLE_BUFFER + 1  # never evicts
    folder = Path(tempfile.mkdtemp())
    runs = [(policy, label, partial(make_policy, policy, budget)) for policy in args.policies
            for label, budget in budgets.items()]  # fmt: skip
    runs += [(f"table {spec}", "table", partial(table_policy, spec, whole, folder)) for spec in args.tables]
    for policy, label, build in runs:
        try:
            chosen = build()
        except ValueError as error:  # budget below the policy's minimum
            print(f"skip {policy} at {label}: {error}")
            continue
        compiled = device == "cuda" and not args.no_compile and chosen.compileable
        longflow_patch.apply(model, policy=chosen, compile=compiled)
        began = time.perf_counter()
        completions = generate(model, tokenizer, prompts, longest, args.batch_size)
        correct = sum(toy.is_correct(c, p["answer"]) for c, p in zip(completions, problems, strict=True))
        with torch.no_grad():
            log_probs, _ = trace_log_probs(
                model, tokenizer, kl_prompts, kl_traces, lambda: longflow_patch.new_cache(model)
            )
        kl = mean_kl(full_log_probs, log_probs, kl_mask)
        release(model)
        rows.append({"policy": policy, "budget_label": label, "budget": chosen.budget,
                     "accuracy": correct / len(problems), "ci": wilson_interval(correct, len(problems)),
                     "blocks_solved": mean_blocks_solved(completions, problems), "kl": kl, "compiled": compiled,
                     **({"head_table": chosen.head_table} if label == "table" else {})})  # fmt: skip
        print(f"{policy:>12} {label:>5} ({chosen.budget:>4} slots): accuracy {correct / len(problems):.3f} "
              f"blocks solved {rows[-1]['blocks_solved']:.3f} KL {kl:.4f} ({time.perf_counter() - began:.0f} s)",
              flush=True)  # fmt: skip
        write(out, {**header, "rows": rows})  # after every configuration: a cut-off run keeps its rows
    write(out, {**header, "rows": rows})
    plot(rows, mean_trace, out.with_suffix(".png"))
    print(f"wrote {out}")


def mean_blocks_solved(completions: list[str], problems: list[dict]) -> float:
    """Mean partial credit (`toy.blocks_solved`) over the problems."""
    scores = [toy.blocks_solved(c, p["answer"]) for c, p in zip(completions, problems, strict=True)]
    return sum(scores) / len(scores)


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def merge(paths: list[Path], out: Path, description: str | None = None) -> None:
    """Combine runs over the same problems (split by policy, or repeated) into one results file and
    plot. The full-cache row is the first file's; a (policy, budget) measured in several files keeps
    the last file's row. History is kept: ``merged_from`` lists each file's own ``merged_from``
    entries, or for a file without any its path, or ``description`` (once) in place of those paths;
    ``note`` joins the files' notes."""
    parts = [json.loads(path.read_text()) for path in paths]
    measured, history = {}, []
    for path, part in zip(paths, parts, strict=True):
        if problem_set(part) != problem_set(parts[0]):
            raise ValueError(f"{path} was run on other problems than {paths[0]}")
        measured |= {(row["policy"], row["budget_label"]): row for row in part["rows"] if row["policy"] != "full"}
        history += [entry for entry in part.get("merged_from") or [description or str(path)] if entry not in history]
    rows = [parts[0]["rows"][0], *measured.values()]
    notes = dict.fromkeys(part["note"] for part in parts if part.get("note"))
    write(out, {**parts[-1], "rows": rows, "merged_from": history, **({"note": " ".join(notes)} if notes else {})})
    plot(rows, parts[0]["mean_trace_tokens"], out.with_suffix(".png"))
    print(f"wrote {out}")


def pool(paths: list[Path], out: Path, baseline: str) -> None:
    """Add up results files measured on different problem sets: for each (policy, budget label)
    measured in every file, problems solved over all of them, mean partial credit, and the one-sided
    Fisher exact p-value that the policy solves more than ``baseline`` at that label (the budget a
    percentage label stands for differs a little between sets; ``budgets`` lists them). Writes
    ``out`` and prints a table."""
    parts = [json.loads(path.read_text()) for path in paths]
    drawn = [problem_set(part) for part in parts]
    for index, problems in enumerate(drawn):
        if problems in drawn[:index]:
            raise ValueError(f"{paths[index]} was run on the same problems as {paths[drawn.index(problems)]}")
    measured = [{(row["policy"], row["budget_label"]): row for row in part["rows"]} for part in parts]
    rows = {}
    for key in (key for key in measured[0] if all(key in found for found in measured)):
        per_set = [(found[key], part["problems"]) for found, part in zip(measured, parts, strict=True)]
        solved = [round(row["accuracy"] * problems) for row, problems in per_set]
        total = sum(problems for _, problems in per_set)
        credit = sum(row["blocks_solved"] * problems for row, problems in per_set)
        rows[key] = {"policy": key[0], "budget_label": key[1], "budgets": [row["budget"] for row, _ in per_set],
                     "solved_per_set": solved, "correct": sum(solved), "problems": total,
                     "accuracy": sum(solved) / total, "ci": wilson_interval(sum(solved), total),
                     "blocks_solved": credit / total}  # fmt: skip
    for (policy, label), row in rows.items():
        base = rows.get((baseline, label))
        if policy not in ("full", baseline) and base is not None:
            row["p_above_baseline"] = fisher_greater(row["correct"], row["problems"], base["correct"], base["problems"])
    sets = [{"file": str(path), "problems": p, "seed": seed, "blocks": list(blocks)}
            for path, (p, seed, blocks) in zip(paths, drawn, strict=True)]  # fmt: skip
    write_results(out, {"benchmark": "accuracy_toy_pooled", "baseline": baseline, "sets": sets,
                        "rows": list(rows.values())})  # fmt: skip
    p_column = f"p > {baseline}"
    table = [{"policy": row["policy"], "budget": row["budget_label"], "solved": f"{row['correct']} / {row['problems']}",
              "accuracy %": f"{100 * row['accuracy']:.2f}", "blocks %": f"{100 * row['blocks_solved']:.2f}",
              p_column: f"{row['p_above_baseline']:.2g}" if "p_above_baseline" in row else None}
             for row in rows.values()]  # fmt: skip
    print_table(table, ["policy", "budget", "solved", "accuracy %", "blocks %", p_column])


def problem_set(results: dict) -> tuple:
    """What identifies the problems a results file was measured on: (count, seed, block range)."""
    return results["problems"], results["seed"], tuple(results["blocks"])


def fisher_greater(hits: int, total: int, base_hits: int, base_total: int) -> float:
    """One-sided Fisher exact test: the probability, with both groups drawing from one rate, that
    the first group of ``total`` holds ``hits`` or more of the ``hits + base_hits`` successes
    (hypergeometric upper tail, exact in integers)."""
    successes = hits + base_hits
    tail = sum(math.comb(total, k) * math.comb(base_total, successes - k)
               for k in range(hits, min(successes, total) + 1))  # fmt: skip
    return tail / math.comb(total + base_total, successes)


def plot(rows: list[dict], mean_trace: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy, blocks, fidelity) = plt.subplots(1, 3, figsize=(16, 4.2))
    full = next(r for r in rows if r["policy"] == "full")
    tab20 = plt.get_cmap("tab20").colors
    colors = [*tab20[0::2], *tab20[1::2]]  # 20 colours, the 10 strong ones first; variants (``name:...``, ``@``) dashed
    for index, policy in enumerate(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full")):
        points = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["budget"])
        budgets = [r["budget"] for r in points]
        below = [r["accuracy"] - r["ci"][0] for r in points]
        above = [r["ci"][1] - r["accuracy"] for r in points]
        style = {"marker": "o", "label": policy, "color": colors[index % 20],
                 "linestyle": "--" if ":" in policy or "@" in policy else "-"}  # fmt: skip
        accuracy.errorbar(budgets, [r["accuracy"] for r in points], yerr=[below, above], capsize=2, **style)
        blocks.plot(budgets, [r.get("blocks_solved", 0.0) for r in points], **style)
        fidelity.plot(budgets, [max(r["kl"], 1e-6) for r in points], **style)
    accuracy.axhline(full["accuracy"], color="black", linestyle="--", label="full cache")
    blocks.axhline(full.get("blocks_solved", 1.0), color="black", linestyle="--", label="full cache")
    for axis in (accuracy, blocks, fidelity):
        axis.set_xscale("log", base=2)
        axis.set_xlabel(f"KV budget (slots; mean trace {mean_trace:.0f} tokens)")
        axis.grid(alpha=0.3)
    accuracy.set_ylabel("accuracy (95% CI)")
    blocks.set_ylabel("blocks solved before the first error")
    fidelity.set_ylabel("mean KL(full || policy) per token")
    fidelity.set_yscale("log")
    figure.tight_layout()
    # Beside the panels, not over a curve: a comparison can hold twenty policies.
    figure.legend(*accuracy.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
