"""Generate completions for a JSON-lines file of prompts with a patched model, over many processes.

    accelerate launch recipes/generate.py --model PATH --prompts prompts.jsonl --out completions.jsonl \\
        --policy longflow --budget 2048 --max-new-tokens 32768
    python recipes/generate.py --model PATH --prompts prompts.jsonl --out completions.jsonl --device-map auto

Input: one JSON object per line with a ``prompt`` string (``--prompt-field``) and optionally an id
(``--id-field``, default ``id``; else the line number). Output: one JSON-lines file, the input rows
in input order, each with ``completion``, ``new_tokens`` and ``finished`` (the model ended it) added.

Every process (``accelerate launch`` or ``torchrun``: one per GPU, or on the CPU when there is
none) takes every N-th prompt still to do and appends each finished batch to its own part file,
``OUT.parts/rank-R.jsonl``; when all are done, rank 0 merges the parts into ``OUT`` in input order
and removes them. An interrupted run loses at most the batches in flight: run the same command
again (with any number of processes) and the prompts found in ``OUT`` or in the part files are
skipped. ``--device-map auto`` instead spreads one model over all visible GPUs, in one process.
Sampling uses seed ``--seed`` plus the process rank.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList, set_seed

import longflow_patch
from longflow_patch.eval.policy_options import parse_settings, policy_options
from longflow_patch.models import padding_on_the_left
from longflow_patch.progress import TokenProgress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model name or directory (from_pretrained)")
    parser.add_argument("--prompts", required=True, type=Path, help="input JSON-lines file")
    parser.add_argument("--out", required=True, type=Path, help="output JSON-lines file")
    parser.add_argument("--prompt-field", default="prompt", help="field holding the prompt text")
    parser.add_argument("--id-field", default="id", help="field holding a row's id (default: the line number)")
    policy = parser.add_argument_group("KV-cache policy (longflow_patch.apply)")
    policy.add_argument("--policy", default="longflow", help=f"one of {', '.join(sorted(longflow_patch.POLICIES))}")
    policy.add_argument("--budget", type=int, default=2048, help="KV slots per layer")
    policy.add_argument("--sink-tokens", type=int)
    policy.add_argument("--recent-window", type=int)
    policy.add_argument("--per-head", action=argparse.BooleanOptionalAction, default=None)
    policy.add_argument("--observation-window", type=int)
    policy.add_argument("--pooling-kernel", type=int)
    policy.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE", help="any other setting")
    policy.add_argument("--compile", action="store_true", help="compile the decode step (GPU)")
    generation = parser.add_argument_group("generation")
    generation.add_argument("--max-new-tokens", type=int, default=32768)
    generation.add_argument("--temperature", type=float, default=0.6, help="0 decodes greedily")
    generation.add_argument("--top-p", type=float, default=0.95)
    generation.add_argument("--batch-size", type=int, default=8, help="prompts per generate call, per process")
    generation.add_argument("--seed", type=int, default=0)
    generation.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap each prompt as a user turn (default: when the tokenizer has a chat template)",
    )
    placement = parser.add_argument_group("placement")
    placement.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    placement.add_argument("--device-map", help="'auto': one process, the model spread over all visible GPUs")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, object]:
    """The policy settings given on the command line, cast to their types."""
    raw = {
        name: getattr(args, name)
        for name in ("budget", "sink_tokens", "recent_window", "per_head", "observation_window", "pooling_kernel")
        if getattr(args, name) is not None
    }
    try:
        return policy_options(args.policy, raw | parse_settings(args.setting))
    except ValueError as error:
        raise SystemExit(str(error)) from error


def read_prompts(path: Path, id_field: str) -> list[dict]:
    """The input rows, each with its id under ``id_field`` (the line number when absent)."""
    rows, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            row = json.loads(line)
            row.setdefault(id_field, number)
            if row[id_field] in seen:
                raise SystemExit(f"{path}: id {row[id_field]!r} appears twice")
            seen.add(row[id_field])
            rows.append(row)
    return rows


def read_results(paths: list[Path], id_field: str) -> dict:
    """Finished rows by id from result files; a line cut off by an interruption is skipped."""
    results = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else ():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            results.setdefault(row[id_field], row)
    return results


def drop_partial_line(path: Path) -> None:
    """Cut a part file back to its last complete line, so that appending starts on a new line."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def load_model(args: argparse.Namespace, options: dict[str, object], device: torch.device):
    """The model, patched with ``options``, and its tokenizer (left padding, a pad token)."""
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, device_map=args.device_map)
    if args.device_map is None:
        model.to(device)
    longflow_patch.apply(model.eval(), policy=args.policy, compile=args.compile, **options)
    return model, padding_on_the_left(AutoTokenizer.from_pretrained(args.model))


def generate_batch(
    model, tokenizer, rows: list[dict], args: argparse.Namespace, progress: TokenProgress | None = None
) -> list[dict]:
    """``rows`` with ``completion``, ``new_tokens`` and ``finished`` added; ``progress`` counts the
    decoding steps of every sequence of the batch as they happen."""
    texts = [row[args.prompt_field] for row in rows]
    chat = tokenizer.chat_template is not None if args.chat_template is None else args.chat_template
    if chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            for text in texts
        ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(model.device)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([] if progress is None else [progress]),
            **({"do_sample": False} | sampling),
        )
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    results = []
    for row, tokens in zip(rows, output[:, inputs.input_ids.shape[1] :].tolist(), strict=True):
        end = next((index for index, token in enumerate(tokens) if token in eos), None)
        kept = tokens if end is None else tokens[:end]
        completion = tokenizer.decode(kept, skip_special_tokens=True)
        results.append(row | {"completion": completion, "new_tokens": len(kept), "finished": end is not None})
    return results


def run(args: argparse.Namespace) -> None:
    options = settings(args)
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes still form a (gloo) group
    if args.device_map is not None and state.num_processes > 1:
        raise SystemExit("--device-map spreads one model over all GPUs: run it as one process, not under a launcher")
    rows = read_prompts(args.prompts, args.id_field)
    parts = args.out.with_name(args.out.name + ".parts")
    own_part = parts / f"rank-{state.process_index}.jsonl"
    drop_partial_line(own_part)
    state.wait_for_everyone()  # every part file is whole before anyone reads them
    done = read_results([args.out, *sorted(parts.glob("rank-*.jsonl"))], args.id_field)
    todo = [row for row in rows if row[args.id_field] not in done]
    state.wait_for_everyone()  # every process has the same view before anyone writes
    mine = sorted(todo[state.process_index :: state.num_processes], key=lambda row: -len(row[args.prompt_field]))
    print(
        f"process {state.process_index + 1}/{state.num_processes}: {len(mine)} of {len(todo)} prompts to do "
        f"({len(rows) - len(todo)} of {len(rows)} done before)",
        file=sys.stderr,
    )
    new_tokens, seconds = 0, 0.0
    if mine:
        set_seed(args.seed + state.process_index)
        model, tokenizer = load_model(args, options, state.device)
        started = time.perf_counter()
        parts.mkdir(parents=True, exist_ok=True)
        quiet = not state.is_main_process
        with (
            own_part.open("a", encoding="utf-8") as part,
            tqdm(total=len(mine), unit="prompt", desc=f"rank {state.process_index}", disable=quiet) as bar,
            tqdm(unit="tok", unit_scale=True, desc="decoded", position=1, disable=quiet) as token_bar,
        ):
            for start in range(0, len(mine), args.batch_size):
                batch = mine[start : start + args.batch_size]
                results = generate_batch(model, tokenizer, batch, args, TokenProgress(token_bar))
                part.write("".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results))
                part.flush()
                bar.update(len(results))
                new_tokens += sum(result["new_tokens"] for result in results)
        seconds = time.perf_counter() - started
    counts = gather_object([(new_tokens, seconds)])  # every process's (tokens, generation seconds)
    if state.is_main_process:
        merge(rows, args.out, parts, args.id_field)
        total, slowest = sum(tokens for tokens, _ in counts), max(elapsed for _, elapsed in counts)
        print(f"generated {total} new tokens in {slowest:.1f} s (slowest of {len(counts)} processes, model loading "
              f"excluded): {total / max(slowest, 1e-9):.0f} tokens/s", file=sys.stderr)  # fmt: skip


def merge(rows: list[dict], out: Path, parts: Path, id_field: str) -> None:
    """Write ``out``: every finished row, in input order; remove the part files once all are in."""
    results = read_results([out, *sorted(parts.glob("rank-*.jsonl"))], id_field)
    finished = [results[row[id_field]] for row in rows if row[id_field] in results]
    temporary = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in finished), encoding="utf-8")
    os.replace(temporary, out)
    if len(finished) == len(rows) and parts.is_dir():
        for path in parts.glob("rank-*.jsonl"):
            path.unlink()
        parts.rmdir()
    print(f"wrote {len(finished)} of {len(rows)} results to {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
