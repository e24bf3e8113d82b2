"""Profile a model's KV needs per layer and head and write ReasonAlloc and LU-KV budget profiles.

Calibration traces (the toy reasoner's own problems with their reference solutions by default) run
teacher-forced through the patched decode path with one KV head at a time held to a budget ``b``
under a token scorer (R-KV by default). Every other head either keeps the whole trace (isolated,
the default) or is held to ``--context-budget`` slots under the same scorer (in context: the
operating point of a tight uniform cache). The held head's utility at ``b`` is minus the mean KL
divergence of the model's next-token distribution from the full cache's, over every trace
position: how much of the model's predictions the budget preserves through the whole eviction
history (long-term), with the tokens the scorer actually keeps.
Choices (the papers leave them open):

- LU-KV utility curve of a head: ``u(b) = -KL(b)``, measured at the ``--grid`` budgets, linear in
  between, flat below the smallest; at the budget that holds the longest calibration sequence it
  is 0 when isolated (nothing is evicted), and flat from the largest grid budget in context.
  Heads are measured one at a time, so utilities are taken as separable, as the solver assumes;
  `greedy_allocate` solves per-head budgets on their envelopes.
- ReasonAlloc layer curve: the sum of its heads' utility curves, the layer's utility with every
  head of it at ``b`` (the per-layer 'reasoning wave'); the same solver turns the layer curves into
  layer budgets. (Format 1 profiles held a need per layer instead, the smallest budget within a
  KL tolerance, split in proportion: a fixed pattern at every total that starved one toy layer.)

Why output fidelity and not attention mass (this recipe's first signal): on the toy reasoner one
layer does the table look-ups (its heads put 99% of their attention on the prompt at a look-up),
yet its attention-mass curves looked like every other layer's, so mass-based budgets gave it no
more slots than the rest, and every scorer lost the table at small budgets.

Why in context: heads measured in isolation miss how losses compound when every head is cut at
once: with every other head at the operating point, a head's marginal value is measured where
the budget is tight.

Cost: (layers x KV heads x grid points) teacher-forced passes; on the toy reasoner 12 x 12.

    python recipes/profile_budgets.py --problems 12 --jobs 12                       # lukv.json, reasonalloc.json
    python recipes/profile_budgets.py --problems 12 --jobs 16 --context-budget 128  # lukv-context128.json, ...
"""

import argparse
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import longflow_patch
from longflow_patch import toy
from longflow_patch.fidelity import mean_kl, trace_log_probs
from longflow_patch.profiles import BudgetProfile

DEFAULT_GRID = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)


def held_table(layers: int, kv_heads: int, held: dict[tuple[int, int], int], others: int) -> list[list[int]]:
    """Tokens per layer per KV head: ``held[(layer, head)]`` for the held heads, about ``others``
    for every other head: the fewest extra slots, spread one at a time from the first of them, that
    make the total a whole number of slots per head (as a policy's ``budget`` must be)."""
    free = layers * kv_heads - len(held)
    short = -(sum(held.values()) + free * others) % (layers * kv_heads)
    limits = iter([others + short // free + (i < short % free) for i in range(free)])
    return [[held[row, column] if (row, column) in held else next(limits) for column in range(kv_heads)]
            for row in range(layers)]  # fmt: skip


def fixed_table_policy(table: list[list[int]], scorer: str, buffer: int, path: Path) -> longflow_patch.Policy:
    """LU-KV over ``scorer`` that keeps exactly ``table`` (tokens per layer per KV head), its profile
    (`BudgetProfile.fixed`) written to ``path``; floor_share 0: the table is the allocation."""
    BudgetProfile.fixed(table, "fixed table").save(path)
    budget = sum(map(sum, table)) // (len(table) * len(table[0]))
    return longflow_patch.make_policy("lukv", budget=budget, profile=path, scorer=scorer, buffer=buffer,
                                      floor_share=0.0)  # fmt: skip


def head_kl(model, tokenizer, prompts: list[str], traces: list[str], reference: tuple, table: list[list[int]],
            scorer: str, buffer: int) -> float:  # fmt: skip
    """Mean KL (nats per token) of ``model`` from its full-cache ``reference`` (`trace_log_probs`:
    log-probabilities and mask) when its KV heads keep ``table`` tokens under ``scorer``."""
    with tempfile.TemporaryDirectory() as folder:
        policy = fixed_table_policy(table, scorer, buffer, Path(folder) / "lukv.json")
        longflow_patch.apply(model, policy=policy)
        try:
            with torch.no_grad():
                new_cache = partial(longflow_patch.new_cache, model)
                log_probs, _ = trace_log_probs(model, tokenizer, prompts, traces, new_cache, chunk=len(prompts))
        finally:
            longflow_patch.unapply(model)
    return mean_kl(reference[0], log_probs, reference[1])


def utility_curves(kl: np.ndarray, grid: list[int], length: int, isolated: bool) -> list[list[list[float]]]:
    """``[L][H][length]`` utilities at budgets ``0..length-1`` from ``kl`` ``[L, H, G]`` measured at
    ``grid``: ``-KL`` linear between grid points (to 6 decimals), flat below the first; at
    ``length - 1`` 0 when ``isolated`` (nothing is evicted), else the last grid point's."""
    budgets, points = np.arange(length), [*grid, length - 1]

    def curve(row: np.ndarray) -> list[float]:
        end = 0.0 if isolated else -row[-1]
        return np.interp(budgets, points, [*(-row), end]).round(6).tolist()

    return [[curve(row) for row in layer] for layer in kl]


def layer_curves(curves: list[list[list[float]]]) -> list[list[float]]:
    """``[L][n]`` from ``[L][H][n]`` head utility curves: each layer's heads summed (heads measured
    one at a time, so taken as separable, as LU-KV's solver does)."""
    return [np.sum(layer, axis=0).round(6).tolist() for layer in curves]


def other_heads_budget(args: argparse.Namespace, length: int) -> int:
    """Slots every head but the measured one keeps: ``--context-budget``, else ``length + buffer + 1``
    (such a head never evicts: its re-selection keeps all)."""
    return args.context_budget or length + args.buffer + 1


def measure(args: argparse.Namespace, heads: list[tuple[int, int]]) -> tuple[list[list[float]], list[int], int]:
    """Load the model and calibration traces named by ``args`` and measure each ``(layer, head)``
    held at every grid budget, the other heads whole or at ``--context-budget``. Returns the KL
    rows (one per head), the grid (``--grid`` budgets below the longest row) and the curve length
    (the longest padded row plus one)."""
    path = args.model or toy.model_path()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    config = model.config
    problems = toy.make_problems(args.problems, args.seed, blocks=tuple(args.blocks), with_solution=True)
    prompts, traces = [p["prompt"] for p in problems], [p["solution"] for p in problems]
    with torch.no_grad():
        reference = trace_log_probs(model, tokenizer, prompts, traces, chunk=len(prompts))
    # The rows trace_log_probs builds: the padded prompts (their pads take slots too), then the traces.
    length = len(tokenizer(prompts, padding=True).input_ids[0]) + reference[0].shape[1] + 1
    grid = sorted(b for b in set(args.grid) if b < length - 1)
    others = other_heads_budget(args, length)
    rows = []
    for layer, head in heads:
        rows.append([])
        for budget in grid:
            table = held_table(config.num_hidden_layers, config.num_key_value_heads, {(layer, head): budget}, others)
            rows[-1].append(head_kl(model, tokenizer, prompts, traces, reference, table, args.scorer, args.buffer))
        print(f"layer {layer} head {head}: KL at {grid}:", np.round(rows[-1], 4).tolist(), flush=True)
    return rows, grid, length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled toy reasoner)")
    parser.add_argument("--problems", type=int, default=8, help="calibration traces")
    parser.add_argument("--seed", type=str, default="calibration")
    parser.add_argument("--blocks", type=int, nargs=2, default=[2, 6], help="calibration problem length range")
    parser.add_argument("--scorer", choices=longflow_patch.SCORERS, default="rkv", help="token scorer profiled")
    parser.add_argument("--buffer", type=int, default=16, help="re-selection buffer of a compacting scorer")
    parser.add_argument(
        "--context-budget",
        type=int,
        default=None,
        help="slots every other head keeps while one is measured (default: the whole trace)",
    )
    parser.add_argument("--grid", type=int, nargs="+", default=list(DEFAULT_GRID), help="budgets measured")
    parser.add_argument("--budget", type=int, default=256, help="slots per head per layer the profiles are solved at")
    parser.add_argument("--minimum", type=int, default=16, help="floor of any head's budget")
    parser.add_argument("--jobs", type=int, default=1, help="processes measuring heads side by side")
    parser.add_argument("--out-dir", type=Path, default=Path("longflow_patch/toy/model/profiles"))
    args = parser.parse_args()

    path = args.model or toy.model_path()
    config = AutoConfig.from_pretrained(path)
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    heads = [(layer, head) for layer in range(layers) for head in range(kv_heads)]
    shares = [heads[job :: args.jobs] for job in range(args.jobs)]
    if args.jobs == 1:
        results = [measure(args, heads)]
    else:  # a small model leaves most of a GPU idle: measure shares of the heads side by side
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(measure, [args] * args.jobs, shares))
    measured = [zip(share, rows, strict=True) for share, (rows, _, _) in zip(shares, results, strict=True)]
    by_head = {pair: row for pairs in measured for pair, row in pairs}
    kl = np.asarray([by_head[pair] for pair in heads]).reshape(layers, kv_heads, -1)
    _, grid, length = results[0]

    total = args.budget * layers * kv_heads
    others = other_heads_budget(args, length)
    context = f"every other head at {others}" if args.context_budget else "the others whole"
    metadata = {
        "calibration": f"{args.problems} toy traces ({args.blocks[0]}-{args.blocks[1]} blocks), seed {args.seed!r}",
        "signal": f"-KL(full || one head held to b under {args.scorer}, buffer {args.buffer}, {context}), "
        "nats per token",
        "grid": grid,
        "kl": kl.tolist(),
    }
    curves = utility_curves(kl, grid, length, isolated=args.context_budget is None)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for method, data in (("lukv", curves), ("reasonalloc", layer_curves(curves))):
        profile = BudgetProfile.from_curves(
            method, str(path), data, total, kv_heads, args.minimum, metadata, others, args.scorer
        )
        written.append(args.out_dir / (f"{method}-context{others}.json" if args.context_budget else f"{method}.json"))
        profile.save(written[-1])
        print(f"{method} at {args.budget} per head:", profile.head_budget_table())
    print("wrote", *written)


if __name__ == "__main__":
    main()
