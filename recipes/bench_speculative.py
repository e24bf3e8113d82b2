"""LongSpec benchmark: `speculative_generate` against the target alone, the verification op, the
acceptance of each draft at long contexts, and the cost of a GLIDE round on the Qwen3-8B shape.

(a) ``toy``: the bundled toy reasoner (6-layer Qwen3, 3.4M parameters) continues a reference chain
    of thought cut to ``context - new_tokens`` tokens (`toy_context`), so acceptance is the real
    model's. For each context: the target alone (``generate``, full dynamic cache, eager; with
    ``--static`` also ``generate`` with a static cache + ``torch.compile``, and a gpt-fast-style
    loop: one compiled one-token forward per token over a static cache, CUDA graphs, no host sync
    per token), then `speculative_generate` for each draft: ``self`` (the target over a LongFlow
    cache) and ``toy`` (the bundled 2-layer draft, `toy.draft_path()`) x ``k`` x ``budget``;
    ``glide`` (the bundled GLIDE draft, `toy.glide_path()`, a ``k`` chain) and ``glide-tree`` (the
    same draft, a ``--tree`` of top-k nodes per depth). Wall-clock tokens/s (median of
    ``--repeats`` after a warmup), acceptance, draft tokens kept per round, tokens per target
    forward, and whether the output equals the target's greedy output. ``speedup_vs_static``
    (``generate``, static cache + compile) and ``speedup_vs_loop`` (the compiled loop) divide those
    target-alone times by the speculative one.
(b) ``verify``: one verification of ``T`` draft tokens on the Qwen3-8B attention shape (32 query
    heads, 8 KV heads, head_dim 128, bf16, batch 1) over an 8k-32k prefix: the verify op, SDPA over
    prefix + ``T`` with a causal mask, and ``T`` sequential decode-op steps (what verifying without
    the op costs), CUDA-event medians.
(c) ``acceptance`` (no timing, CPU is fine): for ``--problems`` contexts of each length, every
    draft's acceptance and tokens per round over ``--new-tokens``, eager; ``--glide-ablation``
    adds a second GLIDE draft (e.g. trained without anchor-offset positions) beside the bundled one.
(d) ``positions`` (no timing, CPU is fine): on ``--problems`` contexts of the longest ``--contexts``
    length, teacher-forced, how often each GLIDE draft's next token is the target's own (lag 1: its
    cross-attention reads the target's cache up to the token before, as in a round's first step),
    by position span, separately for the table look-ups (the digit after ``>k k=``, a fact from far
    back) and for the other chain-of-thought tokens; prompts are not scored.
(e) ``cost``: a GLIDE round's device time on the Qwen3-8B shape with random weights (bf16, one GPU,
    each call replayed from a CUDA graph, or its summed kernel time if it cannot be captured; the
    ``timing`` column says which): the target's one-token step (what the bare compiled loop
    pays per token), one draft step, and a whole round (draft steps + verification) for a chain and
    a tree, over an 8k and a 32k prefix. ``break_even_tokens`` is the tokens per round at which a
    round costs as much as that many target steps; acceptance on random weights means nothing, so
    no speedup is measured here.

(f) ``smollm2`` (no timing, CPU is fine): SmolLM2-135M-Instruct (`longflow_patch.models.smollm2`,
    if installed) with a GLIDE draft trained for it (``--glide``, default
    ``bench/results/glide_smollm2``), on its chat prompts for ``--questions`` of ``--data`` (by
    default those of ``recipes/eval_fidelity.py``, which the draft's training rows leave out):
    acceptance of the chain and the tree over ``--new-tokens``, eager, and whether the output equals
    greedy ``generate``'s.

Writes ``bench/results/speculative.json`` (device, versions, settings, rows) and exits non-zero if
any speculative output differed from the target's. ``--smoke`` runs a tiny CPU-sized version.

    python recipes/bench_speculative.py --part toy cost --static --compile   # GPU, a few minutes
    python recipes/bench_speculative.py --part acceptance positions --glide-ablation DIR   # CPU
    python recipes/bench_speculative.py --smoke --out /tmp/smoke.json
"""

import argparse
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when run with python -P
from eval_fidelity import DEFAULT_DATA, prompt_ids, read_questions
from eval_fidelity import DEFAULT_SETS as FIDELITY_SETS

import longflow_patch
from longflow_patch import toy
from longflow_patch.compat import cache_keyword
from longflow_patch.draft_tree import DraftTree
from longflow_patch.glide import (
    GlideConfig,
    GlideDraft,
    load_glide_draft,
    read_glide_config,
    teacher_forced_logits,
)
from longflow_patch.glide_round import GlideRound
from longflow_patch.sampling import Sampler

from common import build_model, environment, graph_median_ms, median_ms, print_table, write_results

REPO = Path(__file__).resolve().parents[1]
QWEN3_8B = dict(q_heads=32, kv_heads=8, head_dim=128)
TINY_SHAPE = dict(q_heads=4, kv_heads=2, head_dim=16)
PARTS = ("toy", "verify", "acceptance", "positions", "cost", "smollm2")
LONGSPEC_TOKENS_PER_ROUND = 4.82  # LongSpec's 3.82 accepted tokens per round (QwQ, AIME24) plus the target's own


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], nargs="+", default=["all"],
                        help="all: toy, verify and cost (the other parts run only when named)")  # fmt: skip
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192],
                        help="final context lengths (past ~4.8k the toy reasoner is outside its training)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=1024, help="tokens generated per run")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[4], help="k values of the chains")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024], help="LongFlow draft cache budgets")
    parser.add_argument("--drafts", choices=["self", "toy", "glide", "glide-tree"], nargs="+",
                        default=["self", "toy", "glide", "glide-tree"],
                        help="self: the target over a LongFlow cache; toy: the bundled 2-layer draft; "
                             "glide: the GLIDE draft's chain; glide-tree: its tree (--tree)")  # fmt: skip
    parser.add_argument("--tree", type=int, nargs="+", default=[4, 4, 4, 4], help="draft tree: nodes per depth")
    parser.add_argument("--glide", type=Path, default=None, help="GLIDE draft directory (default: the bundled one)")
    parser.add_argument("--glide-ablation", type=Path, default=None,
                        help="a second GLIDE draft run beside it (e.g. trained without anchor offsets)")  # fmt: skip
    parser.add_argument("--problems", type=int, default=3, help="acceptance: contexts per length")
    parser.add_argument("--questions", nargs="+", default=FIDELITY_SETS, metavar="SET:FIRST:COUNT",
                        help="smollm2: questions of --data")  # fmt: skip
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="smollm2: folder of SET.jsonl files")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--static", action="store_true",
                        help="also time static-cache generate + compile and a compiled loop")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="compiled speculative rounds (CUDA graphs, a graph per pending count)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prefixes", type=int, nargs="+", default=[8192, 32768],
                        help="verify and cost: prefix lengths")  # fmt: skip
    parser.add_argument("--verify-tokens", type=int, nargs="+", default=[4, 8], help="verify: draft tokens T")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (for tests)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speculative.json")
    args = parser.parse_args()
    args.part = set(("toy", "verify", "cost") if "all" in args.part else ()) | set(args.part) - {"all"}
    if args.smoke:
        args.contexts, args.new_tokens, args.draft_tokens, args.budgets, args.tree = [96], 16, [2], [32], [2, 2]
        args.prefixes, args.verify_tokens, args.repeats, args.dtype, args.static = [64], [2], 1, "float32", False
        args.problems = 1
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` after one warmup call, synchronising the device around each call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PROBLEM_BLOCKS = 7  # the longest problems the toy reasoner was trained on (about 4.8k tokens)
PROMPT_CHARACTERS = 131  # every toy prompt's length, its last newline included (`longflow_patch.toy.task`)


def toy_context(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """``[1, length]``: 7-block toy problems with their reference chains of thought, one after the
    other (``<bos> prompt solution <eos>`` each), cut to ``length``: the model continues the chain
    of thought the cut falls in. Up to ~4.8k tokens that is the first problem, at lengths the toy
    reasoner was trained on (its greedy output is the reference there). Past them it is the next
    problem: the reasoner then runs at positions past its training and must keep the two tables
    apart; its teacher-forced argmax agrees with the reference on only 70-85% of that problem's
    tokens, so it continues with chains of its own."""
    count = math.ceil(length / 4800) + 1
    ids: list[int] = []
    for problem in toy.make_problems(count, seed=seed, blocks=PROBLEM_BLOCKS, with_solution=True):
        ids += [*tokenizer(problem["prompt"] + problem["solution"]).input_ids, tokenizer.eos_token_id]
    return torch.tensor([ids[:length]])


def compiled_loop(model, ids: torch.Tensor, new: int) -> Callable[[], torch.Tensor]:
    """The target alone, gpt-fast style: prompt forward, then one compiled one-token forward per
    token (``mode="reduce-overhead"``: CUDA graphs) over a static cache, greedy argmax on the
    device, no host sync until the end. Returns a function giving ``[1, L + new]`` ids."""
    length, device = ids.shape[1], ids.device
    cache = StaticCache(config=model.config, max_cache_len=length + new)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
    positions = torch.arange(length + new, device=device)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        cache.reset()
        logits = model(input_ids=ids, **{cache_keyword(model): cache}, cache_position=positions[:length]).logits
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens = [token]
        for index in range(length, length + new - 1):
            where = positions[index : index + 1]
            logits = step(
                input_ids=token, position_ids=where[None], cache_position=where, **{cache_keyword(model): cache}
            ).logits
            token = logits[:, -1].argmax(dim=-1, keepdim=True).clone()  # the graph's output buffer is reused
            tokens.append(token)
        return torch.cat([ids, *tokens], dim=1)

    return run


TIE_LOGIT_GAP = 0.1
"""Logit gap under which two greedy choices are a near tie in bfloat16: with 8 bits of mantissa,
logits of 8-16 round in steps of 0.03-0.06, and a forward that sums in another order (a verified
block of tokens against one token at a time) moves them by a few steps."""


@torch.inference_mode()
def parting(model, ids: torch.Tensor, out: torch.Tensor, expected: torch.Tensor) -> dict:
    """Where ``out`` parts from ``expected`` (``[1, L + new]``, the prompt ``ids`` first): the first
    new token that differs (``first_difference``, None when identical) and the target's logit gap
    there between the two choices, from one forward over the shared prefix (``logit_gap``)."""
    length = ids.shape[1]
    differs = (out[0, length:] != expected[0, length:]).nonzero()
    if not len(differs):
        return dict(identical=True, first_difference=None)
    index = int(differs[0])
    logits = model(expected[:, : length + index]).logits[0, -1].float()
    gap = (logits[expected[0, length + index]] - logits[out[0, length + index]]).abs().item()
    return dict(identical=False, first_difference=index, logit_gap=gap)


def draft_configs(args: argparse.Namespace, drafts: dict) -> list[dict]:
    """Every speculative configuration to run: ``name``, ``draft`` (``"self"`` or a model),
    ``k`` (chain length or tree depth), ``budget`` (LongFlow drafts) and ``tree`` (widths or None)."""
    configs = []
    for name, draft in drafts.items():
        kind = "glide" if isinstance(draft, GlideDraft) else name
        if kind in ("self", "toy"):
            for k, budget in itertools.product(args.draft_tokens, args.budgets):
                configs.append(dict(name=name, draft=draft, k=k, budget=budget, tree=None))
        else:
            if "glide" in args.drafts:
                configs += [dict(name=name, draft=draft, k=k, budget=None, tree=None) for k in args.draft_tokens]
            if "glide-tree" in args.drafts:
                configs.append(dict(name=f"{name}-tree", draft=draft, k=len(args.tree), budget=None,
                                    tree=tuple(args.tree)))  # fmt: skip
    return configs


def speculate(model, ids: torch.Tensor, new: int, config: dict, compile: bool):
    """`speculative_generate` with one configuration; returns ``(output, stats)``."""
    return longflow_patch.speculative_generate(
        model, ids, max_new_tokens=new, draft=config["draft"], budget=config["budget"] or 1024,
        num_draft_tokens=config["k"], draft_tree=config["tree"], compile=compile, return_stats=True,
    )  # fmt: skip


def config_fields(config: dict, stats) -> dict:
    """The row fields naming a configuration and its acceptance."""
    draft = config["draft"]
    offsets = getattr(draft, "anchor_offset", None)
    return dict(draft=config["name"], k=config["k"], budget=config["budget"],
                tree="x".join(map(str, config["tree"])) if config["tree"] else None, anchor_offset=offsets,
                acceptance=stats.acceptance_rate, accepted_per_round=stats.accepted_per_round,
                tokens_per_round=stats.tokens_per_round)  # fmt: skip


def bench_context(args: argparse.Namespace, model, drafts: dict, ids: torch.Tensor, device: torch.device,
                  rows: list[dict]) -> None:  # fmt: skip
    """Append the rows of one context to ``rows``: the target alone, then every draft configuration;
    the results file is rewritten after each row."""
    new = args.new_tokens
    context = ids.shape[1] + new

    def target(**settings: object) -> torch.Tensor:
        return model.generate(input_ids=ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **settings)

    expected = target()
    baselines = {"target": median_seconds(target, device, args.repeats)}
    checks: dict[str, dict] = {}
    if args.static:
        baselines["target-static-compiled"] = median_seconds(
            lambda: target(cache_implementation="static"), device, args.repeats
        )
        loop = compiled_loop(model, ids, new)
        baselines["target-loop-compiled"] = median_seconds(loop, device, args.repeats)
        # Inductor's own kernels round unlike eager ones, so greedy tokens may part at a near tie
        # (they did at 8k on an H100): a baseline's timing all the same, with where it parts.
        checks["target-loop-compiled"] = parting(model, ids, loop(), expected)
    for name, seconds in baselines.items():
        row = dict(part="toy", context=context, config=name, tokens_per_s=new / seconds, **checks.get(name, {}))
        record(args, rows, row)
        print(f"context {context}: {name} {new / seconds:.1f} tok/s {checks.get(name, '')}", flush=True)
    models = [model, *(draft for draft in drafts.values() if not isinstance(draft, (str, GlideDraft)))]
    if args.compile:  # patched once for all runs: calls then reuse the compiled graphs
        for patched in models:
            longflow_patch.apply(patched, budget=max(args.budgets))
    for config in draft_configs(args, drafts):
        result: dict = {}

        def run(config: dict = config, result: dict = result) -> None:
            result["out"], result["stats"] = speculate(model, ids, new, config, args.compile)

        seconds = median_seconds(run, device, args.repeats)
        row = dict(part="toy", context=context, config="speculative", **config_fields(config, result["stats"]),
                   tokens_per_s=new / seconds, **parting(model, ids, result["out"], expected),
                   compiled=args.compile)  # fmt: skip
        for baseline in ("target-static-compiled", "target-loop-compiled"):
            if baseline in baselines:
                row[f"speedup_vs_{baseline.split('-')[1]}"] = baselines[baseline] / seconds
        record(args, rows, row)
        print(f"context {context}: {row['draft']} k={row['k']} {row['tokens_per_s']:.1f} tok/s acceptance "
              f"{row['acceptance']:.2f} kept/round {row['accepted_per_round']:.2f} identical={row['identical']}",
              flush=True)  # fmt: skip
    if args.compile:
        for patched in models:
            longflow_patch.unapply(patched)


def record(args: argparse.Namespace, rows: list[dict], row: dict) -> None:
    """Add ``row`` and rewrite the results file: a run cut off by a time limit keeps its rows."""
    rows.append(row)
    settings = {key: sorted(value) if isinstance(value, set) else str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items()}  # fmt: skip
    write_results(args.out, {"environment": environment(), "settings": settings, "rows": rows})


def load_glide(path: Path | None, model, label: str) -> GlideDraft:
    """A GLIDE draft for ``model`` (the bundled toy one by default), with its training's
    ``anchor_offset`` flag attached for the rows."""
    path = path or toy.glide_path()
    draft = load_glide_draft(path, target=model)
    draft.anchor_offset = read_glide_config(path)[1].get("anchor_offset")
    print(f"{label}: GLIDE draft from {path} (anchor offset: {draft.anchor_offset})", flush=True)
    return draft


def toy_models(args: argparse.Namespace, device: torch.device) -> tuple:
    """The toy reasoner, its tokenizer and the drafts asked for, by name (GLIDE first: a run cut
    short by a time limit keeps its rows)."""
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(toy.model_path(), dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy.model_path())
    model.generation_config.eos_token_id = None  # fixed-length runs: every configuration makes new_tokens tokens
    drafts: dict = {}
    if {"glide", "glide-tree"} & set(args.drafts):
        drafts["glide"] = load_glide(args.glide, model, "glide")
        if args.glide_ablation is not None:
            drafts["glide-ablation"] = load_glide(args.glide_ablation, model, "glide-ablation")
    if "self" in args.drafts:
        drafts["self"] = "self"
    if "toy" in args.drafts:
        drafts["toy"] = AutoModelForCausalLM.from_pretrained(toy.draft_path(), dtype=dtype).to(device).eval()
    return model, tokenizer, drafts


def verify_length(args: argparse.Namespace) -> int:
    """The most tokens a round verifies, so a context never exceeds its length."""
    return max(*args.draft_tokens, sum(args.tree)) + 1


def bench_toy(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    model, tokenizer, drafts = toy_models(args, device)
    for context in args.contexts:
        ids = toy_context(tokenizer, context - args.new_tokens - verify_length(args)).to(device)
        bench_context(args, model, drafts, ids, device, rows)


def bench_acceptance(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    """Acceptance of every draft configuration on ``args.problems`` contexts of each length (eager,
    no timing), then one pooled row per length and configuration."""
    model, tokenizer, drafts = toy_models(args, device)
    configs = draft_configs(args, drafts)
    for context in args.contexts:
        prompts = [toy_context(tokenizer, context - args.new_tokens - verify_length(args), seed=problem).to(device)
                   for problem in range(args.problems)]  # fmt: skip
        measure_acceptance(args, model, configs, prompts, context, rows)


def bench_smollm2(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    """Acceptance of a GLIDE draft for SmolLM2 (chain and tree) on its answers to ``--questions``."""
    from longflow_patch.models import smollm2

    model, tokenizer = smollm2(getattr(torch, args.dtype), device)
    model.generation_config.eos_token_id = None  # fixed-length runs, as for the toy
    glide = load_glide(args.glide or REPO / "bench" / "results" / "glide_smollm2", model, "smollm2")
    configs = draft_configs(args, {"glide": glide})
    prompts = [torch.tensor([prompt_ids(tokenizer, q["question"])], device=device)
               for q in read_questions(args.data, args.questions)]  # fmt: skip
    measure_acceptance(args, model, configs, prompts, "smollm2", rows)


def measure_acceptance(args: argparse.Namespace, model, configs: list[dict], prompts: list[torch.Tensor],
                       context: int | str, rows: list[dict]) -> None:  # fmt: skip
    """One ``acceptance`` row per prompt ``[1, T]`` and configuration (eager), then one
    ``acceptance-pooled`` row per configuration: drafts accepted over drafts proposed, and tokens per
    target forward, over all prompts."""
    pooled: dict[str, list] = {config["name"] + str(config["k"]): [] for config in configs}
    for problem, ids in enumerate(prompts):
        expected = model.generate(input_ids=ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        for config in configs:
            out, stats = speculate(model, ids, args.new_tokens, config, compile=False)
            row = dict(part="acceptance", context=context, problem=problem, **config_fields(config, stats),
                       identical=bool(torch.equal(out, expected)))  # fmt: skip
            pooled[config["name"] + str(config["k"])].append((row, stats))
            record(args, rows, row)
            print(f"context {context} problem {problem}: {row['draft']} k={row['k']} acceptance "
                  f"{row['acceptance']:.3f} kept/round {row['accepted_per_round']:.2f}", flush=True)  # fmt: skip
    for runs in pooled.values():
        first, stats = runs[0][0], [stats for _, stats in runs]
        accepted, rounds = sum(s.accepted for s in stats), sum(s.rounds for s in stats)
        record(args, rows, dict(first, part="acceptance-pooled", problem=len(runs),
                                acceptance=accepted / sum(s.drafted for s in stats),
                                accepted_per_round=accepted / rounds,
                                tokens_per_round=sum(s.new_tokens for s in stats) / (rounds + len(runs)),
                                identical=all(row["identical"] for row, _ in runs)))  # fmt: skip


def lookup_tokens(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """``[T]`` bool: the looked-up table values of toy chains of thought ``ids`` ``[T]`` (the digit
    after ``>k k=``)."""
    marks = torch.tensor(tokenizer.convert_tokens_to_ids([">", "="]))
    found = torch.zeros_like(ids, dtype=torch.bool)
    found[5:] = (ids[:-5] == marks[0]) & (ids[4:-1] == marks[1])
    return found


@torch.no_grad()
def bench_positions(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    """Teacher-forced agreement of each GLIDE draft with the target, by position span, look-ups apart."""
    model, tokenizer, drafts = toy_models(args, device)
    drafts = {name: draft for name, draft in drafts.items() if isinstance(draft, GlideDraft)}
    length = max(args.contexts)
    edges = [0, 1024, 2048, 4096, 8192, 16384]
    spans = [(start, end) for start, end in itertools.pairwise(edges) if start < length]
    counts = {(name, span, kind): [0, 0] for name in drafts for span in spans for kind in ("lookup", "other")}
    for problem in range(args.problems):
        ids = toy_context(tokenizer, length, seed=problem).to(device)
        positions = torch.arange(length, device=device)[None]
        scored = torch.ones(length, dtype=torch.bool, device=device)
        for start in (ids[0] == tokenizer.bos_token_id).nonzero()[:, 0].tolist():  # each <bos> and prompt
            scored[start : start + 1 + PROMPT_CHARACTERS] = False
        lookups = lookup_tokens(ids[0], tokenizer)
        cache = DynamicCache(config=model.config)
        target_tokens = model(input_ids=ids, position_ids=positions, use_cache=True,
                              **{cache_keyword(model): cache}).logits[0].argmax(-1)  # fmt: skip
        lag = torch.ones(1, dtype=torch.int64, device=device)
        for name, draft in drafts.items():
            layer = cache.layers[draft.target_layer_index(len(model.model.layers))]
            predicted = teacher_forced_logits(draft, model, ids, positions, lag, layer.keys, layer.values)[0].argmax(-1)
            # token t counts as right when the draft's guess after token t - 1 is the target's own
            right = torch.cat([torch.zeros(1, dtype=torch.bool, device=device), predicted[:-1] == target_tokens[:-1]])
            for (start, end), kind in itertools.product(spans, ("lookup", "other")):
                where = scored[start:end] & (lookups[start:end] if kind == "lookup" else ~lookups[start:end])
                counts[(name, (start, end), kind)][0] += int(right[start:end][where].sum())
                counts[(name, (start, end), kind)][1] += int(where.sum())
    for (name, (start, end), kind), (right, total) in counts.items():
        record(args, rows, dict(part="positions", draft=name, anchor_offset=drafts[name].anchor_offset,
                                span=f"{start}-{min(end, length)}", tokens=kind, scored=total,
                                agreement=right / total if total else None))  # fmt: skip


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20) -> float:
    """Median time of ``fn`` in ms: CUDA events on a GPU, wall clock on the CPU."""
    if device.type != "cuda":
        return median_seconds(fn, device, 3) * 1e3
    return median_ms(fn, warmup=5, repeats=repeats)


def kernel_ms(fn: Callable[[], object], calls: int = 5) -> float:
    """The summed GPU kernel time of one ``fn`` call in ms (torch.profiler): device work without
    the launch gaps an eager call leaves."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(getattr(event, "self_device_time_total", 0) for event in profile.key_averages()) / 1e3 / calls


def graph_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """Device time of ``fn`` in ms and how it was measured: a CUDA-graph replay, else (an op that
    cannot be captured) the profiler's summed kernel time; the wall clock on the CPU."""
    if device.type != "cuda":
        return time_ms(fn, device), "cpu-wall"
    try:
        return graph_median_ms(fn, calls_per_graph=5, repeats=10), "cuda-graph"
    except RuntimeError as error:
        print(f"CUDA graph capture failed ({str(error)[:120]}); summing kernel times instead", flush=True)
        torch.cuda.synchronize()
        return kernel_ms(fn), "kernel-sum"


def verify_row(prefix: int, length: int, shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """Times of one verification of ``length`` draft tokens over ``prefix`` cached tokens."""
    q_heads, kv_heads, head_dim = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    scale = head_dim**-0.5

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, dtype=dtype, device=device)

    k_cache, v_cache = rand(1, kv_heads, prefix, head_dim), rand(1, kv_heads, prefix, head_dim)
    prefix_len = torch.tensor([prefix], dtype=torch.int32, device=device)
    q = rand(1, q_heads, length, head_dim)
    k_new, v_new = rand(1, kv_heads, length, head_dim), rand(1, kv_heads, length, head_dim)
    k_all, v_all = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
    mask = torch.ones(length, prefix + length, dtype=torch.bool, device=device).tril(prefix)

    def verify() -> torch.Tensor:
        return torch.ops.longflow.verify_attention(q, k_cache, v_cache, prefix_len, k_new, v_new, None, scale)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale, enable_gqa=True)

    # T decode steps over a cache with T free slots (position scores, as the full-cache policy).
    slot_pos = torch.arange(prefix + length, dtype=torch.int32, device=device).expand(1, kv_heads, -1)
    slot_pos = slot_pos.masked_fill(slot_pos >= prefix, -1).contiguous()
    limit = torch.full((1, kv_heads), prefix + length, dtype=torch.int32, device=device)
    value_norm = v_all.float().abs().sum(-1)
    steps = [(q[:, :, t].contiguous(), k_new[:, :, t].contiguous(), v_new[:, :, t].contiguous(),
              torch.tensor([prefix + t], dtype=torch.int32, device=device)) for t in range(length)]  # fmt: skip

    def decode_steps() -> None:
        write = torch.full((1, kv_heads), prefix, dtype=torch.int32, device=device)
        for query, key, value, position in steps:
            torch.ops.longflow.decode_attention(query, key, value, k_all, v_all, value_norm, slot_pos, write,
                                                position, limit, None, scale, 0, 0, True, 2)  # fmt: skip

    error = (verify().float() - sdpa().float()).norm() / sdpa().float().norm()
    return dict(part="verify", prefix=prefix, T=length, verify_ms=time_ms(verify, device),
                sdpa_ms=time_ms(sdpa, device), decode_steps_ms=time_ms(decode_steps, device),
                relative_error_vs_sdpa=float(error))  # fmt: skip


def bench_verify(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    shape = TINY_SHAPE if args.smoke else QWEN3_8B
    dtype = torch.float32 if args.smoke else torch.bfloat16
    for prefix in args.prefixes:
        for length in args.verify_tokens:
            row = verify_row(prefix, length, shape, dtype, device)
            record(args, rows, row)
            print(f"verify prefix {prefix} T={length}: op {row['verify_ms']:.3f} ms, sdpa {row['sdpa_ms']:.3f} ms, "
                  f"{length} decode steps {row['decode_steps_ms']:.3f} ms", flush=True)  # fmt: skip


def round_costs(model, glide: GlideDraft, prefix: int, trees: dict[str, DraftTree], device: torch.device) -> dict:
    """Device times in ms (and how each was measured) over a random ``prefix``-token prompt: the
    target's one-token step, one draft step, and a whole round of each of ``trees``."""
    largest = max(trees.values(), key=lambda tree: tree.nodes)
    decoder = GlideRound(model, glide, Sampler(do_sample=False), largest, None)
    prompt = torch.randint(3, model.config.vocab_size, (1, prefix), device=device)
    token = decoder.prefill(prompt, prefix + largest.nodes + 2)[None]
    at = torch.tensor([[prefix]], device=device)
    cache = decoder.target_cache

    def target_step() -> None:
        decoder._forward(model, token, at, cache)
        cache.rollback(prefix)

    timed = {"target_step": graph_ms(target_step, device),
             "draft_step": graph_ms(lambda: decoder.draft_logits(token, at, None, None), device)}  # fmt: skip
    for name, tree in trees.items():
        cache.draft_mask = None if tree.is_chain else decoder.tree_mask[: tree.nodes + 1, : tree.nodes + 1]

        def whole_round(tree: DraftTree = tree) -> None:
            decoder.draft_and_verify(token, at, None, tree)
            cache.rollback(prefix)

        timed[name] = graph_ms(whole_round, device)
    return timed


@torch.inference_mode()
def bench_cost(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    """Device time of a GLIDE round's parts on the Qwen3-8B shape (random weights; ``tiny`` in
    ``--smoke``): the target's one-token step, one draft step, and whole rounds (chain, tree)."""
    shape = "tiny" if args.smoke else "qwen3-8b"
    model = longflow_patch.apply(build_model(shape, device.type), budget=1024)
    torch.manual_seed(0)
    glide = GlideDraft(GlideConfig.from_target(model.config, window=512)).to(next(model.parameters())).eval()
    trees = {"chain": DraftTree((1,) * max(args.draft_tokens)), "tree": DraftTree(tuple(args.tree))}
    for prefix in args.prefixes:
        timed = round_costs(model, glide, prefix, trees, device)
        step_ms = timed["target_step"][0]
        for name, tree in trees.items():
            round_ms = timed[name][0]
            row = dict(part="cost", shape=shape, prefix=prefix, draft=name, widths="x".join(map(str, tree.widths)),
                       verified=tree.nodes + 1, target_step_ms=step_ms, draft_step_ms=timed["draft_step"][0],
                       round_ms=round_ms, break_even_tokens=round_ms / step_ms,
                       modeled_speedup_at_longspec_acceptance=LONGSPEC_TOKENS_PER_ROUND * step_ms / round_ms,
                       timing=",".join(sorted({how for _, how in timed.values()})))  # fmt: skip
            record(args, rows, row)
            print(f"cost {shape} prefix {prefix} {name} {row['widths']}: round {round_ms:.3f} ms, target step "
                  f"{step_ms:.3f} ms, draft step {row['draft_step_ms']:.3f} ms, break-even "
                  f"{row['break_even_tokens']:.2f} tokens/round", flush=True)  # fmt: skip


def main() -> None:
    args = parse_args()
    torch._dynamo.config.recompile_limit = 64  # the speculative graphs of every context, k and budget
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    rows: list[dict] = []
    if "cost" in args.part:  # first: the one part the toy cannot stand in for
        bench_cost(args, device, rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "toy" in args.part:
        bench_toy(args, device, rows)
    if "acceptance" in args.part:
        bench_acceptance(args, device, rows)
    if "smollm2" in args.part:
        bench_smollm2(args, device, rows)
    if "positions" in args.part:
        bench_positions(args, device, rows)
    if "verify" in args.part:
        bench_verify(args, device, rows)
    tables = {
        "toy": ["context", "config", "draft", "compiled", "k", "tree", "budget", "tokens_per_s", "speedup_vs_static",
                "speedup_vs_loop", "acceptance", "accepted_per_round", "tokens_per_round", "identical",
                "first_difference", "logit_gap"],
        "acceptance-pooled": ["context", "draft", "anchor_offset", "k", "tree", "problem", "acceptance",
                              "accepted_per_round", "tokens_per_round", "identical"],
        "positions": ["draft", "anchor_offset", "span", "tokens", "scored", "agreement"],
        "verify": ["prefix", "T", "verify_ms", "sdpa_ms", "decode_steps_ms", "relative_error_vs_sdpa"],
        "cost": ["shape", "prefix", "draft", "widths", "verified", "target_step_ms", "draft_step_ms", "round_ms",
                 "break_even_tokens", "modeled_speedup_at_longspec_acceptance", "timing"],
    }  # fmt: skip
    for part, columns in tables.items():
        if selected := [row for row in rows if row["part"] == part]:
            print_table(selected, columns)
    # Speculative outputs must be generate's; in bfloat16 they may part where two tokens' logits tie.
    if any(row.get("identical") is False and row.get("config") != "target-loop-compiled"
           and row.get("logit_gap", float("inf")) >= TIE_LOGIT_GAP for row in rows):  # fmt: skip
        sys.exit("speculative output parted from the target's greedy output where it was no near tie (see the results)")


if __name__ == "__main__":
    main()
