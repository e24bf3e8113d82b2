"""Train a GLIDE draft (`longflow_patch.glide`) against a frozen target, LongSpec style.

Each step takes rows of the target's own greedy output, cut to ``--length`` tokens, and:

1. gives every row anchor-offset positions (unless ``--no-anchor-offset``): the first
   ``sink_tokens`` keep positions ``0..s-1``, the rest are shifted by one offset drawn uniformly
   from ``0..--max-position - --length``, so short rows cover the positions a long context uses;
2. runs the frozen target over the rows at those positions and keeps its layer ``target_layer``
   keys (rotated at those positions) and values;
3. runs the draft layer: self-attention under the sink-and-window mask of its decoding cache,
   cross-attention over the target's keys ``j <= i - lag`` (``lag`` drawn per row from
   ``1..--max-lag``: while drafting, the target's cache lags ``d`` tokens behind the ``d``-th draft
   step), and the target's LM head; the loss is next-token cross-entropy on the output tokens, or
   with ``--distill`` the KL divergence from the target's own next-token distribution there.

Targets:

- ``toy``: the bundled toy reasoner. Its greedy output on a problem of 1..7 blocks is the task's
  reference solution token for token (its argmax is the next reference token at every position of
  3 problems of each size; from 8 blocks on it is not), so the rows are reference solutions
  (blocks 1..7) and need no generation: the prompt, then the chain of thought from a random line.
- ``smollm2``: SmolLM2-135M-Instruct (`longflow_patch.models.smollm2`, if installed); the rows are
  its greedy answers (``--smollm2-tokens`` each, in batches) to the chat prompts below and to the
  reasoning questions ``--smollm2-questions`` of ``--data`` (by default ones that
  ``recipes/eval_fidelity.py`` and the acceptance benchmark do not use), generated first and
  cached in ``--checkpoint-dir``; a row is one answer from its prompt on.
- ``--smoke``: a tiny random Qwen3 target on random rows (seconds; for tests).

The draft starts from random weights (``--init target``: a copy of the target's layer
``target_layer``, `GlideDraft.init_from_target`, which learned slower on the toy and faster on
SmolLM2) and is written with `save_glide_draft` (``glide_config.json`` + ``model.safetensors``;
the metadata records the command, steps, tokens and training time). Resumable: ``--resume``
continues from ``--checkpoint-dir``. Runs on the CPU (``--threads``) or a GPU.

    # the bundled toy draft and the ablation without anchor offsets (one H200, 320 s each)
    python recipes/train_glide_draft.py --target toy --rows 64 --steps 1500 --time-budget-s 320 \\
        --out longflow_patch/toy/glide --checkpoint-dir checkpoints/glide_toy
    python recipes/train_glide_draft.py --target toy --rows 64 --steps 1500 --time-budget-s 320 \\
        --no-anchor-offset --out bench/results/glide_toy_no_offset --checkpoint-dir checkpoints/glide_toy_no_offset
    # SmolLM2's (2 CPU threads, about 30 minutes)
    python recipes/train_glide_draft.py --target smollm2 --init target --rows 4 --length 384 --steps 320 \\
        --threads 2 --out bench/results/glide_smollm2 --checkpoint-dir checkpoints/glide_smollm2
    python recipes/train_glide_draft.py --smoke --steps 3 --out /tmp/glide
"""

import argparse
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from longflow_patch import toy
from longflow_patch.glide import GlideConfig, GlideDraft, save_glide_draft, target_key_values, teacher_forced_logits
from longflow_patch.toy.task import random_problem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_fidelity import DEFAULT_DATA, end_ids, generate, prompt_ids, read_questions, until_end

SMOLLM2_PROMPTS = (
    "A train leaves at 3 pm and travels 180 km at 60 km/h. When does it arrive? Explain step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a binary search works and why it takes logarithmic time.",
    "What are the main causes of the seasons on Earth? Think it through carefully.",
    "List five tips for writing clear technical documentation, with a sentence on each.",
    "Solve: a rectangle has perimeter 30 and area 56. What are its sides? Show your reasoning.",
    "Describe the water cycle to a ten-year-old.",
    "Compare lists and tuples in Python, with examples.",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["toy", "smollm2"], default="toy")
    parser.add_argument("--out", type=Path, required=True, help="directory for glide_config.json + model.safetensors")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints/glide"))
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    parser.add_argument("--anchor-offset", action=argparse.BooleanOptionalAction, default=True,
                        help="shift all positions but the sinks by a random offset (LongSpec)")  # fmt: skip
    parser.add_argument("--max-position", type=int, default=None,
                        help="offsets keep positions below this (default: max_position_embeddings)")  # fmt: skip
    parser.add_argument("--length", type=int, default=512, help="tokens per training row")
    parser.add_argument("--rows", type=int, default=8, help="rows per step")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps of the whole schedule")
    parser.add_argument("--time-budget-s", type=float, default=math.inf, help="stop after this many seconds")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--max-lag", type=int, default=6, help="cross-attention lags drawn from 1..max-lag")
    parser.add_argument("--distill", action="store_true",
                        help="loss: KL from the target's own next-token distribution (else cross-entropy on "
                             "its greedy tokens)")  # fmt: skip
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--window", type=int, default=256, help="the draft's self-attention window")
    parser.add_argument("--init", choices=["random", "target"], default="random",
                        help="random weights, or a copy of the target's layer target_layer (on the toy its "
                             "loss fell slower: 2.06 against 1.76 after 32 steps)")  # fmt: skip
    parser.add_argument("--smollm2-tokens", type=int, default=256, help="greedy tokens generated per SmolLM2 prompt")
    parser.add_argument("--smollm2-questions", nargs="*", default=["math:100:48", "gsm8k:100:48"],
                        metavar="SET:FIRST:COUNT", help="questions of --data SmolLM2 answers for its rows")  # fmt: skip
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of SET.jsonl question files")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (SmolLM2's rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny random target and rows (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.length, args.rows, args.log_every, args.window, args.warmup_steps = 64, 2, 1, 16, 1
    return args


# -- target and rows ----------------------------------------------------------------------------
def load_target(args: argparse.Namespace) -> tuple[torch.nn.Module, "RowSource"]:
    """The frozen target (float32, eval) and where its training rows come from."""
    if args.smoke:
        config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             max_position_embeddings=4096)  # fmt: skip
        torch.manual_seed(args.seed)
        target = Qwen3ForCausalLM(config)
        source: RowSource = RandomRows(config.vocab_size)
    elif args.target == "toy":
        target = AutoModelForCausalLM.from_pretrained(toy.model_path(), dtype=torch.float32)
        source = ToyRows()
    else:
        from longflow_patch.models import smollm2

        target, tokenizer = smollm2()
        source = GreedyRows.load_or_generate(target, tokenizer, args)
    target = target.to(args.device).eval().requires_grad_(False)
    return target, source


class RowSource:
    """Rows of the target's output: ``rows(rng, count, length)`` gives ``input_ids`` and ``labels``
    ``[count, length]`` int64 (labels -100 where no loss is taken)."""

    def rows(self, rng: random.Random, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class ToyRows(RowSource):
    """Toy problems of 1..7 blocks, each row the prompt followed by the reference chain of thought
    (the toy reasoner's own greedy output) from a random line on, cut or padded to ``length``:
    short rows cover every part of the chain (later steps, restatements, the answer) and keep the
    table the steps look values up in. Loss on the chain of thought and ``<eos>``."""

    def __init__(self) -> None:
        self.tokenizer = toy.build_tokenizer()

    def rows(self, rng: random.Random, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((count, length), self.tokenizer.pad_token_id, dtype=torch.int64)
        labels = torch.full((count, length), -100, dtype=torch.int64)
        for row in range(count):
            problem = random_problem(rng, rng.randint(1, 7))
            prompt = self.tokenizer(problem.prompt()).input_ids
            solution = problem.solution()
            starts = [0] + [index + 1 for index, char in enumerate(solution[:-1]) if char == "\n"]
            chain = self.tokenizer(solution[rng.choice(starts) :], add_special_tokens=False).input_ids
            full = (prompt + chain + [self.tokenizer.eos_token_id])[:length]
            ids[row, : len(full)] = torch.tensor(full)
            labels[row, len(prompt) : len(full)] = torch.tensor(full[len(prompt) :])
        return ids, labels


class RandomRows(RowSource):
    """Random tokens (``--smoke``)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def rows(self, rng: random.Random, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([[rng.randrange(3, self.vocab) for _ in range(length)] for _ in range(count)])
        return ids, ids.clone()


class GreedyRows(RowSource):
    """The target's greedy answers to fixed prompts; a row is one answer from its prompt on, cut or
    padded to the row length."""

    def __init__(self, sequences: list[tuple[torch.Tensor, int]], pad: int):
        self.sequences, self.pad = sequences, pad

    @classmethod
    def load_or_generate(cls, target, tokenizer, args: argparse.Namespace) -> "GreedyRows":
        """The answers cached in ``--checkpoint-dir`` for these prompts and lengths, or generated
        there (greedy, ``--batch-size`` prompts per ``generate`` call)."""
        questions = read_questions(args.data, args.smollm2_questions) if args.smollm2_questions else []
        texts = [*SMOLLM2_PROMPTS, *(q["question"] for q in questions)]
        prompts = [prompt_ids(tokenizer, text) for text in texts]
        key = {"prompts": texts, "tokens": args.smollm2_tokens}
        path = args.checkpoint_dir / "greedy_rows.pt"
        saved = torch.load(path) if path.is_file() else {}
        if saved.get("key") != key:
            ends, sequences = end_ids(target, tokenizer), []
            with tqdm(total=len(prompts) * args.smollm2_tokens, desc="SmolLM2 answers", unit="tok") as bar:
                for first in range(0, len(prompts), args.batch_size):
                    batch = prompts[first : first + args.batch_size]
                    for prompt, answer in zip(batch, generate(target, tokenizer, batch, args.smollm2_tokens, bar),
                                              strict=True):  # fmt: skip
                        sequences.append((torch.tensor(prompt + until_end(answer, ends)), len(prompt)))
            saved = {"key": key, "sequences": sequences}
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(saved, path)
        answered = sum(len(sequence) - prompt for sequence, prompt in saved["sequences"])
        print(f"SmolLM2 rows: {len(saved['sequences'])} answers, {answered} answer tokens ({path})", flush=True)
        return cls(saved["sequences"], tokenizer.pad_token_id)

    def rows(self, rng: random.Random, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((count, length), self.pad, dtype=torch.int64)
        labels = torch.full((count, length), -100, dtype=torch.int64)
        for row in range(count):
            sequence, prompt_length = rng.choice(self.sequences)
            piece = sequence[:length]  # rows start at the prompt: the draft sees the sinks it will see
            ids[row, : len(piece)] = piece
            labels[row, prompt_length : len(piece)] = piece[prompt_length:]
        return ids, labels


# -- one step -----------------------------------------------------------------------------------
def anchor_offset_positions(rng: random.Random, count: int, length: int, sinks: int, max_position: int | None):
    """``[count, length]`` int64 positions: ``0..length-1``, all but the first ``sinks`` shifted by
    one offset per row from ``0..max_position - length`` (None: no offset)."""
    positions = torch.arange(length).repeat(count, 1)
    if max_position is not None:
        for row in range(count):
            positions[row, sinks:] += rng.randint(0, max(max_position - length, 0))
    return positions


def distillation_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || draft) of the next-token distributions at the ``mask`` ``[B, T]`` positions
    (logits ``[B, T, V]``; the target's carry no gradient)."""
    target_log_p = F.log_softmax(target_logits[mask].float(), dim=-1)
    draft_log_p = F.log_softmax(draft_logits[mask], dim=-1)
    return F.kl_div(draft_log_p, target_log_p, log_target=True, reduction="batchmean")


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to a tenth at ``args.steps``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- main ---------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> GlideDraft:
    """Train as ``args`` say; writes the checkpoint and the draft, returns it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    target, source = load_target(args)
    config = GlideConfig.from_target(target.config, sink_tokens=args.sink_tokens, window=args.window)
    torch.manual_seed(args.seed)
    draft = GlideDraft(config)
    if args.init == "target":
        draft.init_from_target(target)
    draft = draft.to(device).train()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, trained_s, tokens = 0, 0.0, 0
    checkpoint = args.checkpoint_dir / "glide_checkpoint.pt"
    if args.resume:
        state = torch.load(checkpoint, map_location=device)
        draft.load_state_dict(state["draft"])
        optimizer.load_state_dict(state["optimizer"])
        step, trained_s, tokens = state["step"], state["trained_s"], state["tokens"]
        print(f"resumed at step {step} ({trained_s:.0f}s trained) from {checkpoint}", flush=True)
    max_position = (args.max_position or target.config.max_position_embeddings) if args.anchor_offset else None
    layer = draft.target_layer_index(target.config.num_hidden_layers)
    print(
        f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads); {shlex.join(sys.argv)}", flush=True
    )
    print(f"draft: {sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M parameters; target layer {layer}; "
          f"anchor offset {'up to position ' + str(max_position) if max_position else 'off'}; {args.rows} rows x "
          f"{args.length} tokens per step; steps {step}..{args.steps}", flush=True)  # fmt: skip
    started, losses, right, counted = time.monotonic(), [], 0, 0
    while step < args.steps and time.monotonic() - started < args.time_budget_s:
        rng = random.Random(f"glide/{args.seed}/{step}")
        ids, labels = (tensor.to(device) for tensor in source.rows(rng, args.rows, args.length))
        positions = anchor_offset_positions(rng, args.rows, args.length, args.sink_tokens, max_position).to(device)
        lag = torch.tensor([rng.randint(1, args.max_lag) for _ in range(args.rows)], device=device)
        keys, values, hidden = target_key_values(target, ids, positions, layer)
        logits = teacher_forced_logits(draft, target, ids, positions, lag, keys, values)
        targets = labels[:, 1:]
        if args.distill:
            loss = distillation_loss(logits[:, :-1], target.lm_head(hidden[:, :-1]), targets != -100)
        else:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += int((targets != -100).sum())
        losses.append(loss.item())
        trained = targets != -100
        right += int((logits[:, :-1].argmax(-1) == targets)[trained].sum())
        counted += int(trained.sum())
        elapsed = trained_s + time.monotonic() - started
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {sum(losses) / len(losses):.4f}  token acc {right / counted:.4f}  "
                  f"lr {learning_rate(step - 1, args):.2e}  {tokens / elapsed:.0f} tok/s  elapsed {elapsed:.0f}s",
                  flush=True)  # fmt: skip
            losses, right, counted = [], 0, 0
        if step % args.checkpoint_every == 0:
            save_checkpoint(checkpoint, draft, optimizer, step, elapsed, tokens)
    trained_s += time.monotonic() - started
    save_checkpoint(checkpoint, draft, optimizer, step, trained_s, tokens)
    command = "python " + shlex.join([sys.argv[0], *sys.argv[1:]]) if sys.argv else ""
    save_glide_draft(draft, args.out, target=args.target if not args.smoke else "smoke", steps=step,
                     trained_tokens=tokens, train_seconds=round(trained_s), anchor_offset=args.anchor_offset,
                     max_position=max_position, length=args.length, max_lag=args.max_lag, command=command,
                     device=str(device))  # fmt: skip
    print(f"trained {step} steps, {tokens} tokens in {trained_s:.0f}s; draft written to {args.out}", flush=True)
    return draft


def save_checkpoint(path: Path, draft: GlideDraft, optimizer, step: int, trained_s: float, tokens: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(draft=draft.state_dict(), optimizer=optimizer.state_dict(), step=step, trained_s=trained_s,
                 tokens=tokens)  # fmt: skip
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
