"""Profile a model's KV needs per layer and head and write ReasonAlloc and LU-KV budget profiles.

Calibration traces (the toy reasoner's own problems with their reference solutions by default; for
another model, ``--answers``: the full cache's answers that ``recipes/eval_fidelity.py`` keeps beside
its results, the longest loop-free prefixes, cut to ``--answer-tokens``) run teacher-forced
through the patched decode path with one KV head at a time held to a budget ``b``
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

Cost: (layers x KV heads x grid points) teacher-forced passes; on the toy reasoner 12 x 12, on
SmolLM2-135M 90 x the grid.

    python recipes/profile_budgets.py --problems 12 --jobs 12                       # lukv.json, reasonalloc.json
    python recipes/profile_budgets.py --problems 12 --jobs 16 --context-budget 128  # lukv-context128.json, ...
    python recipes/profile_budgets.py --model smollm2 --answers calibration.answers.json --problems 4 \
        --answer-tokens 384 --grid 32 96 256 --scorer longflow --jobs 2   # in bench/results/profiles/smollm2/
"""

import argparse
import json
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

import longflow_patch
from longflow_patch import toy
from longflow_patch.fidelity import position_metrics, repetition_start, trace_hidden_states
from longflow_patch.models import load_pretrained, smollm2_path
from longflow_patch.profiles import BudgetProfile

DEFAULT_GRID = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)
TOY_PROFILES = Path("longflow_patch/toy/model/profiles")
SMOLLM2_PROFILES = Path("bench/results/profiles/smollm2")


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


def head_kl(model, calibration: "Calibration", table: list[list[int]], scorer: str, buffer: int) -> float:
    """Mean KL (nats per token) of ``model`` from its full cache over the ``calibration`` traces
    when its KV heads keep ``table`` tokens under ``scorer``."""
    with tempfile.TemporaryDirectory() as folder:
        policy = fixed_table_policy(table, scorer, buffer, Path(folder) / "lukv.json")
        longflow_patch.apply(model, policy=policy)
        try:
            with torch.no_grad():
                new_cache = partial(longflow_patch.new_cache, model)
                hidden, mask = trace_hidden_states(model, calibration.prompts, calibration.traces, calibration.pad_id,
                                                   new_cache, chunk=len(calibration.prompts))  # fmt: skip
                kl = position_metrics(model.get_output_embeddings(), calibration.reference, hidden,
                                      calibration.targets, mask)["kl"]  # fmt: skip
        finally:
            longflow_patch.unapply(model)
    return float(kl[mask.cpu()].mean())


@dataclass
class Calibration:
    """Calibration traces: prompt and trace token ids, the pad id, and the full cache's final hidden
    states ``[N, T, hidden]`` (`trace_hidden_states`) and trace tokens ``[N, T]``."""

    prompts: list[list[int]]
    traces: list[list[int]]
    pad_id: int
    reference: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def measure(cls, model, prompts: list[list[int]], traces: list[list[int]], pad_id: int) -> "Calibration":
        with torch.no_grad():
            reference, mask = trace_hidden_states(model, prompts, traces, pad_id, chunk=len(prompts))
        targets = torch.tensor([t + [pad_id] * (mask.shape[1] - len(t)) for t in traces])
        return cls(prompts, traces, pad_id, reference, targets)

    @property
    def length(self) -> int:
        """Tokens of the longest padded row (padded prompts take slots too) plus one."""
        return max(map(len, self.prompts)) + max(map(len, self.traces)) + 1


def load_model(name: str | None):
    """``(model, tokenizer)`` on the GPU (bfloat16) or the CPU (float32): the toy reasoner (None),
    SmolLM2 (``"smollm2"``) or a model directory."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return load_pretrained(name or toy.model_path(), dtype, device)


def model_config(name: str | None):
    """The config of the model ``load_model(name)`` loads, without loading its weights."""
    if name == "smollm2":
        path = smollm2_path()
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return AutoConfig.from_pretrained(name or toy.model_path())


def calibration_ids(args: argparse.Namespace, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and trace token ids: of the answers in ``--answers`` cut to their loop-free prefixes,
    the ``--problems`` longest (first ones on ties), each then cut to ``--answer-tokens``; or toy
    problems with their reference solutions."""
    if args.answers is not None:
        answers = json.loads(args.answers.read_text())["answers"]
        prefixes = []
        for answer in answers:
            ids = answer["answer_ids"]
            start = repetition_start(ids, args.loop_span)
            prefixes.append(ids[: start if start is not None else len(ids)])
        chosen = sorted(range(len(answers)), key=lambda i: -len(prefixes[i]))[: args.problems]
        return [answers[i]["prompt_ids"] for i in chosen], [prefixes[i][: args.answer_tokens] for i in chosen]
    problems = toy.make_problems(args.problems, args.seed, blocks=tuple(args.blocks), with_solution=True)
    prompts = [tokenizer(p["prompt"]).input_ids for p in problems]
    return prompts, [tokenizer(p["solution"], add_special_tokens=False).input_ids for p in problems]


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
    model, tokenizer = load_model(args.model)
    config = model.config
    calibration = Calibration.measure(model, *calibration_ids(args, tokenizer), tokenizer.pad_token_id)
    length = calibration.length
    grid = sorted(b for b in set(args.grid) if b < length - 1)
    others = other_heads_budget(args, length)
    rows = []
    for layer, head in heads:
        rows.append([])
        for budget in grid:
            table = held_table(config.num_hidden_layers, config.num_key_value_heads, {(layer, head): budget}, others)
            rows[-1].append(head_kl(model, calibration, table, args.scorer, args.buffer))
        print(f"layer {layer} head {head}: KL at {grid}:", np.round(rows[-1], 4).tolist(), flush=True)
    return rows, grid, length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="'smollm2' or a model directory (default: the bundled toy reasoner)")  # fmt: skip
    parser.add_argument("--problems", type=int, default=8, help="calibration traces")
    parser.add_argument("--answers", type=Path, default=None,
                        help="calibration answers: an answers file of recipes/eval_fidelity.py (needed "
                        "for any model but the toy)")  # fmt: skip
    parser.add_argument("--answer-tokens", type=int, default=384, help="longest calibration answer (--answers)")
    parser.add_argument("--loop-span", type=int, default=32, help="answers are cut where such a window repeats")
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
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"default: {TOY_PROFILES} (toy), {SMOLLM2_PROFILES} (smollm2)")  # fmt: skip
    args = parser.parse_args()
    if args.model is not None and args.answers is None:
        parser.error("--answers is needed for any model but the toy reasoner (its own problems calibrate it)")
    if args.out_dir is None:
        if args.model not in (None, "smollm2"):
            parser.error("--out-dir is needed for a model directory")
        args.out_dir = SMOLLM2_PROFILES if args.model == "smollm2" else TOY_PROFILES
    buffer = {"buffer": args.buffer} if "buffer" in longflow_patch.policy_settings(args.scorer) else {}
    try:  # a head is held to each grid budget under the scorer: the smallest must be one it takes
        longflow_patch.make_policy(args.scorer, budget=min(args.grid), **buffer)
    except ValueError as error:
        parser.error(f"--grid {min(args.grid)} under --scorer {args.scorer}: {error}")

    path = "SmolLM2-135M-Instruct" if args.model == "smollm2" else args.model or toy.model_path()
    config = model_config(args.model)
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
    if args.answers is not None:
        calibration = (f"the {args.problems} longest loop-free answer prefixes of {args.answers}, "
                       f"cut to {args.answer_tokens} tokens")  # fmt: skip
    else:
        calibration = f"{args.problems} toy traces ({args.blocks[0]}-{args.blocks[1]} blocks), seed {args.seed!r}"
    metadata = {
        "calibration": calibration,
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
        name = method if args.model is None else f"{method}-{args.scorer}"  # the toy's are all R-KV's
        written.append(args.out_dir / (f"{name}-context{others}.json" if args.context_budget else f"{name}.json"))
        profile.save(written[-1])
        print(f"{method} at {args.budget} per head:", profile.head_budget_table())
    print("wrote", *written)


if __name__ == "__main__":
    main()
