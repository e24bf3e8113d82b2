"""Whole-model decode step with ragged per-head budgets (LU-KV, ReasonAlloc) against uniform
LongFlow at the same total budget. Target: ragged within 5% of uniform decode time.

A random-weight Qwen3-8B shape (36 layers, 32 query / 8 KV heads, head_dim 128; weights do not
change speed), bf16, patched by `longflow_patch.apply` four ways for each batch x budget ``b``
(the mean slots per KV head per layer):

- ``uniform``: LongFlow, every KV head ``b`` slots, per-KV-head eviction (the allocators' granularity);
- ``ragged``: LU-KV from a synthetic profile whose solved per-head budgets lie in ``[b/4, 1.5 b]``
  and sum to ``8 b`` per layer (drawn as in `ragged_overhead.py`), through the real path:
  profile JSON -> greedy solver -> cache (physical slots: the layer's largest head budget) -> op;
- ``moved``: ReasonAlloc (even layer budgets from a flat profile, ``1.5 b`` physical slots per
  head) with every layer's head limits then set to a fresh ragged draw summing to ``8 b``, the
  state after online re-allocation has moved budget between heads, and its online step in the
  timed step at every position (``rebalance_every=1``, its most frequent setting; the default
  is every 4th). With the short prompt the heads still have empty slots, so the step decides
  without moving: the move itself, one key/value row per row and layer, is timed by
  `ragged_overhead.py` on full caches;
- ``shared``: LongFlow as shipped by default (the heads of a layer share eviction), for reference.

Each decode step (the model's forward for one new token per sequence, logits included) is
captured in a CUDA graph after a 16-token prompt and replayed; the time is the median of CUDA
events. The op's cost does not depend on how full the cache is (it reads every live slot), so
the short prompt times the same step as a full cache. Shapes whose ragged cache would not fit
beside the weights are skipped and listed.

    python bench/ragged_decode.py
"""

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

import longflow_patch
from longflow_patch.compat import cache_keyword
from longflow_patch.profiles import BudgetProfile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules (`common`), also under python -P
from ragged_overhead import CAPACITY, ragged_limits

from common import SHAPES, build_model, environment, graph_median_ms, parse_args_on_gpu, print_table, write_results

PROMPT = 16


def synthetic_lukv_profile(path: Path, layers: int, kv_heads: int, budget: int, seed: int) -> list[list[int]]:
    """Write an LU-KV profile whose solution at ``budget`` slots per head is a ragged table
    ``[layers][kv_heads]`` (returned): head ``h``'s utility curve rises by one per slot up to its
    drawn budget and ends there (`BudgetProfile.fixed`)."""
    generator = torch.Generator().manual_seed(seed)
    table = ragged_limits(layers, budget, math.ceil(CAPACITY * budget), generator, kv_heads).tolist()
    BudgetProfile.fixed(table, "synthetic ragged").save(path)
    return table


def flat_reasonalloc_profile(path: Path, layers: int, kv_heads: int, budget: int) -> None:
    """Write a ReasonAlloc profile whose layers all need the same: ``budget`` slots per head each."""
    BudgetProfile.fixed([[budget] * kv_heads] * layers, "flat", "reasonalloc").save(path)


def move_budgets(cache, budget: int, seed: int) -> None:
    """Set every layer's head limits to a ragged draw in ``[budget / 4, 1.5 budget]`` summing to
    ``kv_heads * budget`` per row: where ReasonAlloc's online moves may take a layer."""
    generator = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        batch, kv_heads, slots = layer.keys.shape[:3]
        layer.slot_limit.copy_(ragged_limits(batch, budget, slots, generator, kv_heads))


def decode_step_ms(model, batch: int, after_prompt=None) -> float:
    """Median time of one captured decode step of the patched ``model`` at ``batch`` sequences;
    ``after_prompt(cache)`` runs between the prompt and the first decode step."""
    device, vocab = model.device, model.config.vocab_size
    cache = longflow_patch.new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, vocab, (batch, PROMPT), device=device), **{cache_keyword(model): cache})
        if after_prompt is not None:
            after_prompt(cache)
        token = torch.randint(3, vocab, (batch, 1), device=device)
        position = torch.full((batch, 1), PROMPT, device=device)
        cache_position = torch.tensor([PROMPT], device=device)

        def step():
            return model(
                input_ids=token, position_ids=position, cache_position=cache_position, **{cache_keyword(model): cache}
            )

        return graph_median_ms(step, calls_per_graph=10, repeats=11)


def fits(model, batch: int, physical_slots: int, cap_gb: float) -> bool:
    """Whether weights + a cache of ``physical_slots`` per KV head per layer stay under ``cap_gb``."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = batch * config.num_hidden_layers * config.num_key_value_heads * physical_slots * config.head_dim * 2 * 2
    return (weights + cache) / 2**30 <= cap_gb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 2048, 8192], help="mean slots per KV head")
    parser.add_argument("--memory-cap-gb", type=float, default=64.0, help="skip shapes whose weights + cache exceed it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/ragged_decode.json")
    args = parse_args_on_gpu(parser)

    model = build_model(args.shape, "cuda")
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    make_policy = longflow_patch.make_policy
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as folder:
        for budget in args.budgets:
            lukv, reasonalloc = Path(folder) / f"lukv_{budget}.json", Path(folder) / f"reasonalloc_{budget}.json"
            synthetic_lukv_profile(lukv, layers, kv_heads, budget, args.seed)
            flat_reasonalloc_profile(reasonalloc, layers, kv_heads, budget)
            physical = math.ceil(CAPACITY * budget)  # ReasonAlloc's; LU-KV's largest head budget is at most this

            def move(cache, budget=budget):
                move_budgets(cache, budget, args.seed)

            # Built once per budget, so each profile is loaded and solved once (the policy caches it).
            layouts = {  # name: (policy, what runs after the prompt)
                "uniform": (make_policy("longflow", budget=budget, per_head=True), None),
                "ragged": (make_policy("lukv", budget=budget, profile=lukv, floor_share=0.0), None),
                "moved": (make_policy("reasonalloc", budget=budget, per_head=True, profile=reasonalloc,
                                      rebalance_every=1), move),
                "shared": (make_policy("longflow", budget=budget), None),
            }  # fmt: skip
            for batch in args.batches:
                if not fits(model, batch, physical, args.memory_cap_gb):
                    skipped.append({"batch": batch, "budget": budget, "physical_slots": physical})
                    print(f"batch {batch:>3} budget {budget:>5}: skipped (over {args.memory_cap_gb} GiB)", flush=True)
                    continue
                row = {"batch": batch, "budget": budget, "physical_slots": physical}
                for name, (policy, after_prompt) in layouts.items():
                    longflow_patch.apply(model, policy)
                    row[f"{name}_ms"] = decode_step_ms(model, batch, after_prompt)
                    torch.cuda.empty_cache()
                row["ragged/uniform"] = row["ragged_ms"] / row["uniform_ms"]
                row["moved/uniform"] = row["moved_ms"] / row["uniform_ms"]
                row["ragged/shared"] = row["ragged_ms"] / row["shared_ms"]
                rows.append(row)
                print(f"batch {batch:>3} budget {budget:>5}: ragged/uniform {row['ragged/uniform']:.3f} "
                      f"moved/uniform {row['moved/uniform']:.3f}", flush=True)  # fmt: skip
    longflow_patch.unapply(model)

    columns = ["uniform_ms", "ragged_ms", "moved_ms", "shared_ms", "ragged/uniform", "moved/uniform", "ragged/shared"]
    print_table(rows, ["batch", "budget", *columns])
    worst = max(max(row["ragged/uniform"], row["moved/uniform"]) for row in rows)
    print(f"worst ragged or moved / uniform {worst:.3f} (target <= 1.05); skipped: {skipped or 'none'}")
    write_results(args.out, {
        "benchmark": "ragged_decode", "environment": environment(),
        "model": {"shape": args.shape, **SHAPES[args.shape]}, "dtype": "bfloat16", "prompt": PROMPT,
        "capacity": CAPACITY, "seed": args.seed,
        "memory_cap_gb": args.memory_cap_gb, "worst_over_uniform": worst, "skipped": skipped, "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
