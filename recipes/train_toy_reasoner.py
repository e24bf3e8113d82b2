"""Train the toy reasoner (`longflow_patch.toy`) from scratch on freshly generated problems.

Every step trains on problems drawn from string seeds ``train/<seed>/<step>`` (held-out
evaluation uses integer seeds, so it never sees a training problem), all with the same number of
blocks: a problem's token count is fixed by its blocks, so a batch needs no padding and no
packing. The number of blocks is uniform in 1..``--max-blocks`` (7: sequences of 790-4800
tokens), the upper end growing from 2 over the first ``--curriculum`` fraction of the steps. The
loss covers the chain of thought, the answer and ``<eos>``, not the random prompt. bf16 autocast
and fused AdamW on CUDA, linear warmup then cosine decay.

Measured on one H100 (``bench/results/train_toy_reasoner_*.log``): 3.4M parameters (6 layers,
hidden 256, 8 query / 2 KV heads of 32), 1.26-1.32M tokens/s, about 0.1 s per step of 2^17 tokens.
The 6000-step schedule took two calls (4448 steps in 440 s, then the rest in 160 s) and left the
model at a teacher-forced token accuracy of 1.0000 but 60% greedy accuracy: it never answered
4- and 5-block problems, running on past the last block. A second phase of 1500 steps that weights
the go-on-or-answer token after each restatement 20x (``--decision-weight``; 154 s) fixed it:
400/400 fresh problems right with a full cache.

    # phase 1 (two calls of --time-budget-s 440; the second with --resume)
    python recipes/train_toy_reasoner.py --device cuda --time-budget-s 440
    # phase 2: the decision fine-tune
    python recipes/train_toy_reasoner.py --device cuda --resume --steps 7500 --schedule-start 6000 \\
        --warmup-steps 50 --lr 4e-4 --decision-weight 20

    # the 2-layer draft for speculative decoding (`toy.draft_path()`; about 110 s)
    python recipes/train_toy_reasoner.py --device cuda --layers 2 --steps 3000 --warmup-steps 200 \\
        --eval-problems 0 --out longflow_patch/toy/draft --checkpoint-dir checkpoints/toy_draft

    # CPU smoke test (seconds)
    python recipes/train_toy_reasoner.py --device cpu --smoke --steps 3 --out /tmp/toy

Each call ends with a checkpoint in ``--checkpoint-dir``, the model files in ``--out`` and, unless
``--eval-problems 0``, the greedy accuracy on held-out problems (2-6 blocks, left-padded, bf16).
The checkpoint (model, optimizer, step, RNG states, arguments; ~41 MB) is split into parts of at
most 15 MiB; the model directory gets model.safetensors (float32, 13.5 MB), config.json,
generation_config.json, tokenizer.json and tokenizer_config.json.
"""

import argparse
import copy
import io
import math
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM
from transformers.utils import logging as transformers_logging

from longflow_patch.toy import MODEL_DIR, build_tokenizer, is_correct, make_problems, model_config, parse_prompt
from longflow_patch.toy.task import DEFAULT_BLOCKS, MAX_BLOCKS, Problem, random_problem
from longflow_patch.toy.tokenizer import BOS, CHARACTERS, EOS, VOCAB

SMOKE_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
}
BATCH_FIELDS = ("input_ids", "labels", "lookups", "decisions")
_LOOKUP = re.compile(r">[a-z] [a-z]=(\d)")
_RESTATEMENT = re.compile(r"^R1=.*\n", re.MULTILINE)
CHECKPOINT_PART_BYTES = 15 * 2**20
CHECKPOINT_PART = "checkpoint.pt.{:03d}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=MODEL_DIR, help="model directory to write (default: the bundled one)"
    )
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints/toy_reasoner"))
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps of the whole schedule")
    parser.add_argument("--time-budget-s", type=float, default=math.inf, help="stop training after this many seconds")
    parser.add_argument("--tokens-per-step", type=int, default=2**17)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument(
        "--schedule-start",
        type=int,
        default=0,
        help="step where warmup and cosine decay begin (a second phase after --resume)",
    )
    parser.add_argument(
        "--decision-weight",
        type=float,
        default=1.0,
        help="loss weight of the go-on-or-answer token after each restatement",
    )
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--max-blocks", type=int, default=7, help=f"longest training problems (1..{MAX_BLOCKS})")
    parser.add_argument("--curriculum", type=float, default=0.3, help="fraction of steps over which lengths grow")
    parser.add_argument("--workers", type=int, default=4, help="data-loader processes")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-problems", type=int, default=64, help="held-out problems at the end (0: none)")
    parser.add_argument("--eval-seed", type=int, default=1_000_000)
    parser.add_argument("--smoke", action="store_true", help="tiny model and batches, short problems (CPU test)")
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default: the toy reasoner's 6; fewer for a draft)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens_per_step, args.max_blocks, args.workers, args.warmup_steps = 1024, 1, 0, 1
        args.log_every, args.eval_problems = 1, min(args.eval_problems, 2)
    if not 1 <= args.max_blocks <= MAX_BLOCKS:
        parser.error(f"--max-blocks must lie in 1..{MAX_BLOCKS}")
    return args


# -- data ---------------------------------------------------------------------------------------
_CHAR_IDS = np.zeros(128, dtype=np.int64)
_CHAR_IDS[[ord(char) for char in CHARACTERS]] = [VOCAB[char] for char in CHARACTERS]


def encode(text: str) -> np.ndarray:
    """Token ids of ``text`` ([len(text)] int64), as the tokenizer gives them, without ``<bos>``."""
    return _CHAR_IDS[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]


class TrainBatches(Dataset):
    """Item ``step`` is that step's batch, the same whichever process builds it or when.

    Returns ``input_ids`` and ``labels``, both ``[rows, length]`` int64: ``<bos>`` prompt solution
    ``<eos>``, labels -100 over ``<bos>`` and the prompt; and ``lookups`` ``[rows, length]`` bool,
    the looked-up table values; ``decisions`` ``[rows, length]`` bool, the first token after each
    restatement (the next step, or ``answer`` once the prompt's block count is reached). rows *
    length is at most tokens_per_step (one row at least).
    """

    def __init__(self, seed: int, steps: int, tokens_per_step: int, max_blocks: int, curriculum: float):
        self.seed, self.steps, self.tokens_per_step = seed, steps, tokens_per_step
        self.max_blocks, self.curriculum_steps = max_blocks, curriculum * steps

    def __len__(self) -> int:
        return self.steps

    def blocks_limit(self, step: int) -> int:
        if step >= self.curriculum_steps:
            return self.max_blocks
        return min(self.max_blocks, 2 + int((self.max_blocks - 1) * step / self.curriculum_steps))

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = random.Random(f"train/{self.seed}/{step}")
        blocks = rng.randint(1, self.blocks_limit(step))
        first = self.encode_problem(random_problem(rng, blocks))
        rows = [first] + [
            self.encode_problem(random_problem(rng, blocks)) for _ in range(1, self.tokens_per_step // first[0].size)
        ]
        columns = zip(*rows, strict=True)
        return {name: torch.from_numpy(np.stack(column)) for name, column in zip(BATCH_FIELDS, columns, strict=True)}

    @staticmethod
    def encode_problem(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(input ids, labels, lookups, decisions) of one problem, each ``[length]``; ``lookups``
        marks the table values each step looks up (the tokens that need facts from far back),
        ``decisions`` the tokens that decide whether to go on or answer."""
        prompt, solution = problem.prompt(), problem.solution()
        ids = np.concatenate([[VOCAB[BOS]], encode(prompt), encode(solution), [VOCAB[EOS]]])
        labels = ids.copy()
        labels[: 1 + len(prompt)] = -100
        lookups = np.zeros(ids.size, dtype=bool)
        lookups[[1 + len(prompt) + match.start(1) for match in _LOOKUP.finditer(solution)]] = True
        decisions = np.zeros(ids.size, dtype=bool)
        decisions[[1 + len(prompt) + match.end() for match in _RESTATEMENT.finditer(solution)]] = True
        return ids, labels, lookups, decisions


# -- optimisation -------------------------------------------------------------------------------
def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to ``args.lr`` from ``args.schedule_start``, then cosine decay to a tenth of it
    at ``args.steps``."""
    step -= args.schedule_start
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    steps = args.steps - args.schedule_start
    progress = min(1.0, (step - args.warmup_steps) / max(1, steps - args.warmup_steps))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, decisions: torch.Tensor, weight: float) -> torch.Tensor:
    """Next-token cross-entropy over the labelled tokens, the decision tokens weighted ``weight``.

    ``logits`` ``[rows, length, vocab]``; ``labels`` ``[rows, length]`` int64 (-100: not trained);
    ``decisions`` ``[rows, length]`` bool.
    """
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
    weights = (targets != -100).float() * torch.where(decisions[:, 1:], weight, 1.0)
    return (losses * weights.flatten()).sum() / weights.sum()


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused on CUDA."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


# -- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(directory: Path, state: dict) -> None:
    """``state`` serialised and split into parts of at most 15 MiB (a copy-back limit)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("checkpoint.pt.*"):
        stale.unlink()
    for index, start in enumerate(range(0, len(data), CHECKPOINT_PART_BYTES)):
        (directory / CHECKPOINT_PART.format(index)).write_bytes(data[start : start + CHECKPOINT_PART_BYTES])


def load_checkpoint(directory: Path) -> dict:
    parts = sorted(directory.glob("checkpoint.pt.*"))
    if not parts:
        raise FileNotFoundError(f"no checkpoint in {directory} (looked for {CHECKPOINT_PART.format(0)}, ...)")
    data = b"".join(part.read_bytes() for part in parts)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    count: int,
    seed: int,
    blocks: int | tuple[int, int],
    max_new_tokens: int | None = None,
    batch_size: int = 128,
) -> tuple[float, dict[int, list[bool]]]:
    """Greedy accuracy on ``count`` held-out problems, batched with left padding.

    Returns the accuracy and, per number of blocks, whether each problem was right.
    ``max_new_tokens`` defaults to each batch's longest reference completion plus 16.
    """
    problems = make_problems(count, seed, blocks=blocks, with_solution=True)
    problems.sort(key=lambda problem: len(problem["solution"]))
    results: dict[int, list[bool]] = defaultdict(list)
    device = next(model.parameters()).device
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        inputs = tokenizer([problem["prompt"] for problem in batch], return_tensors="pt", padding=True).to(device)
        limit = max_new_tokens or max(len(problem["solution"]) for problem in batch) + 16
        output = model.generate(
            **inputs,
            max_new_tokens=limit,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        completions = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for problem, completion in zip(batch, completions, strict=True):
            results[parse_prompt(problem["prompt"]).blocks].append(is_correct(completion, problem["answer"]))
    total = [right for per_length in results.values() for right in per_length]
    return sum(total) / len(total), dict(sorted(results.items()))


# -- main ---------------------------------------------------------------------------------------
def write_model(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():
        if path.stat().st_size > 16 * 2**20:
            raise RuntimeError(f"{path} is over 16 MiB")


def train_steps(model: Qwen3ForCausalLM, optimizer: torch.optim.Optimizer, step: int, args: argparse.Namespace) -> int:
    """Optimizer steps from ``step`` until ``args.steps`` or the time budget; returns the step reached.

    Every ``args.log_every`` steps it prints the mean loss and, on that step's batch, the
    teacher-forced accuracy of all trained tokens and of the table lookups alone (the long-range
    skill; the local arithmetic is learned first)."""
    device = next(model.parameters()).device
    forward = torch.compile(model) if args.compile else model
    batches = TrainBatches(args.seed, args.steps, args.tokens_per_step, args.max_blocks, args.curriculum)
    loader = DataLoader(
        batches,
        batch_size=None,
        sampler=range(step, args.steps),
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=8 if args.workers else None,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    started, first_step, tokens = time.monotonic(), step, 0
    losses = []
    for batch in loader:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        input_ids, labels, decisions = (
            batch[name].to(device, non_blocking=True) for name in ("input_ids", "labels", "decisions")
        )
        with autocast:
            logits = forward(input_ids=input_ids).logits
        loss = weighted_loss(logits, labels, decisions, args.decision_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += input_ids.numel()
        losses.append(loss.detach())
        elapsed = time.monotonic() - started
        if step % args.log_every == 0 or step == args.steps:
            right = logits[:, :-1].argmax(-1) == input_ids[:, 1:]
            token_accuracy = right[labels[:, 1:] != -100].float().mean().item()
            lookup_accuracy = right[batch["lookups"][:, 1:].to(device)].float().mean().item()
            decision_accuracy = right[decisions[:, 1:]].float().mean().item()
            print(
                f"step {step:5d}  loss {torch.stack(losses).mean().item():.4f}  token acc {token_accuracy:.4f}  "
                f"lookup acc {lookup_accuracy:.4f}  decision acc {decision_accuracy:.4f}  "
                f"lr {learning_rate(step - 1, args):.2e}  "
                f"blocks<={batches.blocks_limit(step - 1)}  {tokens / elapsed / 1e3:.0f}k tok/s  "
                f"elapsed {elapsed:.0f}s  remaining ~{(args.steps - step) * elapsed / (step - first_step):.0f}s",
                flush=True,
            )
            losses.clear()
        if elapsed >= args.time_budget_s:
            print(f"time budget of {args.time_budget_s:.0f}s reached at step {step}", flush=True)
            break
    return step


def train(args: argparse.Namespace) -> float | None:
    """Train (or continue) as ``args`` say, write the checkpoint and the model; returns the
    held-out accuracy, or None when no evaluation was asked for."""
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")
    transformers_logging.disable_progress_bar()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    overrides = dict(SMOKE_MODEL) if args.smoke else {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    model = Qwen3ForCausalLM(model_config(**overrides)).to(device)
    optimizer = make_optimizer(model, args, device)
    step = 0
    if args.resume:
        state = load_checkpoint(args.checkpoint_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        restore_rng(state["rng"])
        print(f"resumed at step {step} from {args.checkpoint_dir}", flush=True)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters / 1e6:.2f}M parameters on {device}; steps {step}..{args.steps}", flush=True)

    step = train_steps(model, optimizer, step, args)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": rng_state()}
    save_checkpoint(args.checkpoint_dir, {**state, "args": vars(args)})
    print(f"checkpoint at step {step} written to {args.checkpoint_dir}", flush=True)

    model.eval()
    tokenizer = build_tokenizer()
    write_model(model, tokenizer, args.out)
    print(f"model written to {args.out}", flush=True)
    if not args.eval_problems:
        return None
    eval_model = copy.deepcopy(model).to(torch.bfloat16) if device.type == "cuda" else model
    started = time.monotonic()
    accuracy, per_length = evaluate(
        eval_model,
        tokenizer,
        args.eval_problems,
        args.eval_seed,
        blocks=1 if args.smoke else DEFAULT_BLOCKS,
        max_new_tokens=48 if args.smoke else None,
    )
    detail = "  ".join(f"{blocks} blocks {sum(right)}/{len(right)}" for blocks, right in per_length.items())
    print(
        f"held-out greedy accuracy {accuracy:.1%} on {args.eval_problems} problems at step {step} "
        f"({time.monotonic() - started:.0f}s): {detail}",
        flush=True,
    )
    return accuracy


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
