"""LongSpec benchmark: `speculative_generate` against the target alone, and the verification op.

(a) ``toy``: the bundled toy reasoner (6-layer Qwen3, 3.4M parameters) continues a reference chain
    of thought cut to ``context - new_tokens`` tokens, so acceptance is the real model's. For each
    context: the target alone (``generate``, full dynamic cache, eager; with ``--static`` also
    ``generate`` with a static cache + ``torch.compile``, and a gpt-fast-style loop: one compiled
    one-token forward per token over a static cache, CUDA graphs, no host sync per token), then
    `speculative_generate` for each draft (``self``: the target over a LongFlow cache; ``toy``:
    the bundled 2-layer draft, `toy.draft_path()`) x ``k`` x ``budget``: wall-clock tokens/s
    (median of ``--repeats`` after a warmup), acceptance rate, tokens per target forward, and
    whether the output equals the target's greedy output. ``speedup`` is against the fastest
    target-alone configuration measured.
(b) ``verify``: one verification of ``T`` draft tokens on the Qwen3-8B attention shape (32 query
    heads, 8 KV heads, head_dim 128, bf16, batch 1) over an 8k-32k prefix: the verify op, SDPA over
    prefix + ``T`` with a causal mask, and ``T`` sequential decode-op steps (what verifying without
    the op costs), CUDA-event medians.

Writes ``bench/results/speculative.json`` (device, versions, settings, rows) and exits non-zero if
any speculative output differed from the target's. ``--smoke`` runs a tiny CPU-sized version.

    python recipes/bench_speculative.py --static --compile   # GPU, a few minutes
    python recipes/bench_speculative.py --smoke --out /tmp/smoke.json
"""

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import longflow_patch
from longflow_patch import toy
from longflow_patch.compat import cache_keyword

from common import environment, median_ms, print_table, write_results

REPO = Path(__file__).resolve().parents[1]
QWEN3_8B = dict(q_heads=32, kv_heads=8, head_dim=128)
TINY_SHAPE = dict(q_heads=4, kv_heads=2, head_dim=16)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["toy", "verify", "all"], default="all")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096],
                        help="final context lengths (at most ~4.8k: the toy reasoner's trained lengths)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=1024, help="tokens generated per run")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[4, 8], help="k values")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024], help="draft cache budgets")
    parser.add_argument("--drafts", choices=["self", "toy"], nargs="+", default=["self", "toy"],
                        help="self: the target as its own draft; toy: the bundled 2-layer draft")  # fmt: skip
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--static", action="store_true",
                        help="also time static-cache generate + compile and a compiled loop")  # fmt: skip
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compiled speculative steps (CUDA graphs); compiles 2 graphs per context x k x budget",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prefixes", type=int, nargs="+", default=[8192, 16384, 32768], help="verify: prefix lengths")
    parser.add_argument("--verify-tokens", type=int, nargs="+", default=[4, 8], help="verify: draft tokens T")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (for tests)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speculative.json")
    args = parser.parse_args()
    if args.smoke:
        args.contexts, args.new_tokens, args.draft_tokens, args.budgets = [96], 16, [2], [32]
        args.prefixes, args.verify_tokens, args.repeats, args.dtype, args.static = [64], [2], 1, "float32", False
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


TRAINED_BLOCKS = 7  # the longest problems the toy reasoner was trained on (about 4.8k tokens)


def toy_prefix(tokenizer, length: int) -> torch.Tensor:
    """``[1, length]``: a 7-block toy problem with its reference chain of thought, cut to ``length``:
    the model continues the chain of thought at that point. Longer contexts would leave the lengths
    the model was trained on (its acceptance there says nothing), so they are refused."""
    problem = toy.make_problems(1, seed=0, blocks=TRAINED_BLOCKS, with_solution=True)[0]
    ids = tokenizer(problem["prompt"] + problem["solution"], return_tensors="pt").input_ids
    if length > ids.shape[1]:
        raise ValueError(f"context {length} is longer than the toy reasoner's longest trained problem ({ids.shape[1]})")
    return ids[:, :length]


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


def bench_context(args: argparse.Namespace, model, drafts: dict, ids: torch.Tensor, device: torch.device,
                  rows: list[dict]) -> None:  # fmt: skip
    """Append the rows of one context to ``rows``: the target alone, then every draft x ``k`` x
    ``budget``; the results file is rewritten after each row."""
    new = args.new_tokens
    context = ids.shape[1] + new

    def target(**settings: object) -> torch.Tensor:
        return model.generate(input_ids=ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **settings)

    expected = target()
    baselines = {"target": median_seconds(target, device, args.repeats)}
    if args.static:
        baselines["target-static-compiled"] = median_seconds(
            lambda: target(cache_implementation="static"), device, args.repeats
        )
        loop = compiled_loop(model, ids, new)
        baselines["target-loop-compiled"] = median_seconds(loop, device, args.repeats)
        if not torch.equal(loop(), expected):
            sys.exit("the compiled target loop differs from generate's greedy output")
    for name, seconds in baselines.items():
        record(args, rows, dict(part="toy", context=context, config=name, tokens_per_s=new / seconds))
        print(f"context {context}: {name} {new / seconds:.1f} tok/s", flush=True)
    reference = min(baselines.values())
    models = [model, *(draft for draft in drafts.values() if draft != "self")]
    if args.compile:  # patched once for all runs: calls then reuse the compiled graphs
        for patched in models:
            longflow_patch.apply(patched, budget=max(args.budgets))
    for (name, draft), k, budget in itertools.product(drafts.items(), args.draft_tokens, args.budgets):
        result: dict = {}

        def speculate(draft=draft, k: int = k, budget: int = budget, result: dict = result) -> None:
            result["out"], result["stats"] = longflow_patch.speculative_generate(
                model,
                ids,
                max_new_tokens=new,
                draft=draft,
                budget=budget,
                num_draft_tokens=k,
                compile=args.compile,
                return_stats=True,
            )

        seconds = median_seconds(speculate, device, args.repeats)
        stats = result["stats"]
        row = dict(part="toy", context=context, config="speculative", draft=name, k=k, budget=budget,
                   tokens_per_s=new / seconds, speedup=reference / seconds,
                   acceptance=stats.acceptance_rate, tokens_per_round=stats.tokens_per_round,
                   identical=bool(torch.equal(result["out"], expected)), compiled=args.compile)  # fmt: skip
        record(args, rows, row)
        print(f"context {context}: draft={name} k={k} budget={budget} {row['tokens_per_s']:.1f} tok/s "
              f"x{row['speedup']:.2f} acceptance {row['acceptance']:.2f} identical={row['identical']}",
              flush=True)  # fmt: skip
    if args.compile:
        for patched in models:
            longflow_patch.unapply(patched)


def record(args: argparse.Namespace, rows: list[dict], row: dict) -> None:
    """Add ``row`` and rewrite the results file: a run cut off by a time limit keeps its rows."""
    rows.append(row)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    write_results(args.out, {"environment": environment(), "settings": settings, "rows": rows})


def bench_toy(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(toy.model_path(), dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy.model_path())
    drafts: dict = {"self": "self"} if "self" in args.drafts else {}
    if "toy" in args.drafts:
        drafts["toy"] = AutoModelForCausalLM.from_pretrained(toy.draft_path(), dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # fixed-length runs: every configuration makes new_tokens tokens
    for context in args.contexts:
        ids = toy_prefix(tokenizer, context - args.new_tokens - max(args.draft_tokens) - 1).to(device)
        bench_context(args, model, drafts, ids, device, rows)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20) -> float:
    """Median time of ``fn`` in ms: CUDA events on a GPU, wall clock on the CPU."""
    if device.type != "cuda":
        return median_seconds(fn, device, 3) * 1e3
    return median_ms(fn, warmup=5, repeats=repeats)


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


def main() -> None:
    args = parse_args()
    torch._dynamo.config.recompile_limit = 64  # the speculative graphs of every context, k and budget
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    rows: list[dict] = []
    if args.part in ("toy", "all"):
        bench_toy(args, device, rows)
    if args.part in ("verify", "all"):
        bench_verify(args, device, rows)
    toy_rows = [row for row in rows if row["part"] == "toy"]
    if toy_rows:
        print_table(toy_rows, ["context", "config", "draft", "compiled", "k", "budget", "tokens_per_s", "speedup",
                               "acceptance", "tokens_per_round", "identical"])  # fmt: skip
    verify_rows = [row for row in rows if row["part"] == "verify"]
    if verify_rows:
        print_table(verify_rows, ["prefix", "T", "verify_ms", "sdpa_ms", "decode_steps_ms", "relative_error_vs_sdpa"])
    if any(row.get("identical") is False for row in rows):
        sys.exit("speculative output differed from the target's greedy output (see the results file)")


if __name__ == "__main__":
    main()
