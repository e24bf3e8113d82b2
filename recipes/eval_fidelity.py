"""Fidelity of every KV policy on a real pretrained model against the full cache (SmolLM2-135M-Instruct
by default; ``--model PATH`` takes any supported Hugging Face model directory).

Three measurements (``--parts``), for every policy at every budget:

- ``traces``: the model's own long answers. Questions from reasoning sets (``--data``: JSON lines
  with a ``question``, e.g. MATH-500, GSM8K, AIME) in the chat template, answered by the full cache
  greedily and, with ``--sampled``, also sampled at ``--temperature`` (fixed seed), up to
  ``--new-tokens`` tokens. Each policy decodes every answer teacher-forced (one forward per batch:
  the patched attention runs the fused decode step token by token, so this is exactly sequential
  decoding with eviction) and is compared with the full cache at every token: KL(full || policy)
  and top-1 agreement. The model falls into repetition loops, and inside a loop any recency
  policy predicts the copy well, so positions before an answer's first repeated ``--loop-span``-token
  window (its loop-free prefix, `longflow_patch.fidelity.repetition_start`) are reported apart from
  positions inside loops (of which the first ``--loop-tail`` tokens are measured).
- ``ppl``: long real text in StreamingLLM's protocol: Python standard-library sources (``--ppl-modules``,
  the first ``--ppl-tokens`` tokens of each), decoded token by token under compression after a
  one-token prompt (teacher-forced, as above); perplexity overall and against position.
- ``free``: free-running greedy generation under compression from the first ``--free-prompts``
  questions, ``--free-tokens`` new tokens: the first position where the output leaves the full
  cache's (run in the same batches), and how often it falls into a repetition loop.

Budgets: slots (``256``) or a percentage (``10%``) of the part's mean sequence: prompt and
measured answer (``traces``, ``free``; a reasoning model's answer dwarfs its prompt, a small chat
model's may not) or the document (``ppl``). The prompt takes slots too, as in any use of the
cache. A budget that holds every row whole (in every KV head, with a compacting policy's buffer)
evicts nothing: its row is the full cache's, recorded without running. Policies
are the specs of ``recipes/eval_accuracy.py`` (``lukv+rkv``, ``longflow:per_head``,
``longflow@sink_tokens=16``, ...); the allocators read their profiles from ``--profiles``
(``recipes/profile_budgets.py``). One setting is the recipe's own, for the study of LongFlow's
settings: ``@protect_prompt=True`` keeps every prompt token (each answer runs alone, with
``sink_tokens`` its prompt's length; not in ``free``).

Results: ``--out`` (JSON: rows per part, policy and budget; device, versions, settings and every
command that wrote to it) and a PNG beside it (KL and agreement against budget, one line per policy;
perplexity against position; first divergence against budget). Interrupted, the same command
resumes: measured configurations are kept, and the full cache's answers are kept beside the JSON
(``.answers.json``), so more policies can be added to a finished run.

    python recipes/eval_fidelity.py --model smollm2 --out bench/results/fidelity_smollm2.json
    python recipes/eval_fidelity.py --model /models/DeepSeek-R1-Distill-Qwen-7B --device cuda --dtype bfloat16 \\
        --new-tokens 8192 --budgets 5% 10% 20% 40% 1024 2048 --out r1.json
"""

import argparse
import importlib.util
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_accuracy import CHOICES, make_policy, policy_spec, split_settings

import longflow_patch
from longflow_patch.fidelity import position_metrics, repetition_start, trace_hidden_states
from longflow_patch.models import load_pretrained
from longflow_patch.progress import TokenProgress

from common import environment, print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "reasoning"
DEFAULT_SETS = ["math:0:8", "gsm8k:0:4", "aime24:0:2", "aime25:0:2"]
DEFAULT_BUDGETS = ["5%", "10%", "20%", "40%", "128", "256", "512"]
DEFAULT_POLICIES = ["longflow", "streamingllm", "h2o", "snapkv", "rkv", "random", "lukv+longflow",
                    "reasonalloc+longflow", "lukv+rkv", "reasonalloc+rkv"]  # fmt: skip
# Standard-library modules every Python has; their sources are the long documents of the ppl part.
DEFAULT_PPL_MODULES = ["inspect", "argparse"]
PARTS = ("traces", "ppl", "free")
RECIPE_SETTINGS = ("protect_prompt",)  # spec settings this recipe reads itself (not policy fields)


@dataclass
class Answer:
    """A full-cache answer: its question's ``set`` and ``index``, how it was decoded (``greedy`` or
    ``sampled``), the prompt token ids, the answer's tokens measured (all of them, or up to
    ``--loop-tail`` tokens past where it falls into a loop), where it falls into a loop
    (`repetition_start`; None if it never does) and how many tokens it had."""

    set: str
    index: int
    kind: str
    prompt_ids: list[int]
    answer_ids: list[int]
    loop_start: int | None
    generated: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (longflow_patch.models) or a model directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)")  # fmt: skip
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, type=spec_argument,
                        help="SPEC[@FIELD=VALUE...], SPEC one of: " + ", ".join(CHOICES))  # fmt: skip
    parser.add_argument("--budgets", nargs="+", default=DEFAULT_BUDGETS, type=budget_label,
                        help="slots, or N%% of the mean full-cache answer length")  # fmt: skip
    parser.add_argument("--profiles", type=Path, default=None,
                        help="folder of lukv*.json / reasonalloc*.json profiles for the allocators "
                        "(default for smollm2: bench/results/profiles/smollm2)")  # fmt: skip
    questions = parser.add_argument_group("questions and answers (traces, free)")
    questions.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of SET.jsonl files")
    questions.add_argument("--sets", nargs="+", default=DEFAULT_SETS, metavar="SET:FIRST:COUNT",
                           help="questions FIRST..FIRST+COUNT-1 of DATA/SET.jsonl")  # fmt: skip
    questions.add_argument("--new-tokens", type=int, default=1024, help="longest full-cache answer")
    questions.add_argument("--sampled", action="store_true", help="also a sampled answer to each question")
    questions.add_argument("--temperature", type=float, default=0.6, help="of the sampled answers")
    questions.add_argument("--seed", type=int, default=0, help="of the sampled answers")
    questions.add_argument("--loop-span", type=int, default=32, help="a repeated window this long is a loop")
    questions.add_argument("--loop-tail", type=int, default=64,
                           help="tokens of a loop measured (the rest repeats what came before)")  # fmt: skip
    text = parser.add_argument_group("long text (ppl)")
    text.add_argument("--ppl-modules", nargs="+", default=DEFAULT_PPL_MODULES, help="standard-library modules")
    text.add_argument("--ppl-tokens", type=int, default=1024, help="tokens of each module's source")
    text.add_argument("--ppl-window", type=int, default=128, help="positions per point of perplexity vs position")
    free = parser.add_argument_group("free-running generation (free)")
    free.add_argument("--free-prompts", type=int, default=8, help="the first questions (of --sets, in order)")
    free.add_argument("--free-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward / generate call")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fidelity_smollm2.json")
    parser.add_argument("--answers", type=Path, default=None,
                        help="the full cache's answers, kept and reused (default: OUT's .answers.json)")  # fmt: skip
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="only merge these results files (one setting, split by part or policy)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.answers is None:
        args.answers = args.out.with_suffix(".answers.json")
    if args.profiles is None and args.model == "smollm2":
        args.profiles = ROOT / "bench" / "results" / "profiles" / "smollm2"
    return args


def spec_argument(spec: str) -> str:
    """A policy spec of ``eval_accuracy`` (checked there), with this recipe's own settings allowed."""
    base, fields = split_settings(spec)
    policy_spec("@".join([base, *(f"{k}={v!r}" for k, v in fields.items() if k not in RECIPE_SETTINGS)]))
    return spec


def budget_label(label: str) -> str:
    number = label[:-1] if label.endswith("%") else label
    try:
        if float(number) <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {label!r} is not a positive slot count or percentage") from None
    return label


def settings_key(args: argparse.Namespace) -> dict:
    """What identifies the measurements a results file holds (policies and budgets may be added)."""
    names = ("model", "dtype", "sets", "new_tokens", "sampled", "temperature", "seed", "loop_span", "loop_tail",
             "ppl_modules", "ppl_tokens", "ppl_window", "free_prompts", "free_tokens", "batch_size")  # fmt: skip
    return {name: getattr(args, name) for name in names}


def read_questions(data: Path, sets: list[str]) -> list[dict]:
    """``{"set", "index", "question"}`` for each ``SET:FIRST:COUNT`` of ``sets``, in that order."""
    questions = []
    for item in sets:
        name, first, count = item.split(":")
        path = data / f"{name}.jsonl"
        if not path.is_file():
            raise SystemExit(f"no question file {path}: pass --data FOLDER holding {name}.jsonl")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        chosen = rows[int(first) : int(first) + int(count)]
        if len(chosen) < int(count):
            raise SystemExit(f"{path} has {len(rows)} questions; {item} asks for up to {int(first) + int(count)}")
        questions += [{"set": name, "index": int(first) + i, "question": row["question"]}
                      for i, row in enumerate(chosen)]  # fmt: skip
    return questions


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The question as a user turn of the chat template (plain text for a tokenizer without one)."""
    if tokenizer.chat_template is None:
        return tokenizer(question).input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    return tokenizer(text, add_special_tokens=False).input_ids


def generate(model, tokenizer, prompts: list[list[int]], new_tokens: int, bar: tqdm, **sampling) -> list[list[int]]:
    """One ``generate`` call over left-padded ``prompts``: each row's new tokens, ``new_tokens``
    of them (an ended row continues with the pad token), as lists."""
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([TokenProgress(bar)]),
                             **({"do_sample": False} | sampling))  # fmt: skip
    rows = out[:, width:].tolist()
    return [row + [tokenizer.pad_token_id] * (new_tokens - len(row)) for row in rows]


def until_end(tokens: list[int], end_ids: set[int]) -> list[int]:
    """``tokens`` up to (without) the first end-of-sequence token."""
    return next((tokens[:i] for i, token in enumerate(tokens) if token in end_ids), tokens)


def end_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {tokenizer.eos_token_id}


def full_cache_answers(model, tokenizer, args, questions: list[dict]) -> list[Answer]:
    """The full cache's greedy answers (and sampled ones with ``--sampled``), generated in batches of
    ``--batch-size`` through the patched op with nothing evicted, or read from ``--answers`` when it
    holds them for these settings (written after every batch: resumable). Each is measured whole,
    or up to ``--loop-tail`` tokens past where it falls into a loop."""
    path = args.answers
    generation = ("model", "dtype", "sets", "new_tokens", "sampled", "temperature", "seed", "batch_size")
    key = {name: value for name, value in settings_key(args).items() if name in generation}
    saved = json.loads(path.read_text()) if path.exists() else {}
    answers = saved.get("answers", []) if saved.get("key") == key else []
    kinds = ["greedy", "sampled"] if args.sampled else ["greedy"]
    todo = [(kind, q) for kind in kinds for q in questions]
    prompts = {(q["set"], q["index"]): prompt_ids(tokenizer, q["question"]) for q in questions}
    if len(answers) < len(todo):
        longflow_patch.apply(model, policy="full")
        with tqdm(total=(len(todo) - len(answers)) * args.new_tokens, desc="full-cache answers", unit="tok") as bar:
            while len(answers) < len(todo):
                start = len(answers)
                kind = todo[start][0]
                batch = [item for item in todo[start : start + args.batch_size] if item[0] == kind]  # one kind a call
                if kind == "sampled":
                    torch.manual_seed(args.seed + start)
                    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": 0, "top_p": 1.0}
                else:
                    sampling = {}
                rows = [prompts[q["set"], q["index"]] for _, q in batch]
                for (kind, q), tokens in zip(batch, generate(model, tokenizer, rows, args.new_tokens, bar, **sampling),
                                             strict=True):  # fmt: skip
                    answers.append({"set": q["set"], "index": q["index"], "kind": kind,
                                    "prompt_ids": prompts[q["set"], q["index"]],
                                    "answer_ids": until_end(tokens, end_ids(model, tokenizer))})  # fmt: skip
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"key": key, "answers": answers}) + "\n")
        longflow_patch.unapply(model)
    measured = []
    for a in answers:
        ids, start = a["answer_ids"], repetition_start(a["answer_ids"], args.loop_span)
        kept = ids if start is None else ids[: start + args.loop_tail]
        measured.append(Answer(a["set"], a["index"], a["kind"], prompts[a["set"], a["index"]], kept, start, len(ids)))
    return measured


@dataclass
class Batch:
    """Rows teacher-forced together: their prompt and trace ids, the full cache's hidden states
    ``[b, T, hidden]``, the trace tokens ``[b, T]`` and the mask of real ones ``[b, T]``."""

    rows: list[int]
    prompts: list[list[int]]
    traces: list[list[int]]
    reference: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def reference_batches(model, pad_id: int, prompts, traces, batch_size: int) -> list[Batch]:
    """The rows in batches of similar length (longest first), each with the full cache's hidden states."""
    order = sorted(range(len(traces)), key=lambda i: -(len(prompts[i]) + len(traces[i])))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch_prompts, batch_traces = [prompts[i] for i in rows], [traces[i] for i in rows]
        with torch.no_grad():
            reference, mask = trace_hidden_states(model, batch_prompts, batch_traces, pad_id, chunk=2)
        width = mask.shape[1]
        targets = torch.tensor([t + [pad_id] * (width - len(t)) for t in batch_traces])
        batches.append(Batch(rows, batch_prompts, batch_traces, reference, targets, mask))
    return batches


def teacher_forced(model, batches: list[Batch], pad_id: int, policy_for: Callable, bar: tqdm) -> dict[int, dict]:
    """Each row's ``[T]`` metrics (`position_metrics`), by row, each batch under the policy
    ``policy_for(its prompts)`` gives."""
    lm_head = model.get_output_embeddings()
    metrics = {}
    for batch in batches:
        policy = policy_for(batch.prompts)
        longflow_patch.apply(model, policy=policy)
        with torch.no_grad():
            hidden, _ = trace_hidden_states(model, batch.prompts, batch.traces, pad_id,
                                            lambda: longflow_patch.new_cache(model), chunk=len(batch.rows))  # fmt: skip
            values = position_metrics(lm_head, batch.reference, hidden, batch.targets, batch.mask)
        for slot, row in enumerate(batch.rows):
            length = len(batch.traces[slot])
            metrics[row] = {name: value[slot, :length] for name, value in values.items()}
        bar.update(int(batch.mask.sum()))
    longflow_patch.unapply(model)
    return metrics


def split_batches(batches: list[Batch]) -> list[Batch]:
    """The same rows one per batch (for settings that differ per row)."""
    single = []
    for batch in batches:
        for slot, row in enumerate(batch.rows):
            length = len(batch.traces[slot])
            one = slice(slot, slot + 1), slice(None, length)
            single.append(Batch([row], [batch.prompts[slot]], [batch.traces[slot]], batch.reference[one],
                                batch.targets[one], batch.mask[one]))  # fmt: skip
    return single


def policy_maker(
    spec: str, budget: int, profiles: Path | None, longest_prompt: int
) -> Callable[[list[list[int]]], longflow_patch.Policy]:
    """A function of a batch's prompts giving the policy ``spec`` runs for them at ``budget``;
    ValueError now when the spec cannot be built at this budget (with ``protect_prompt``, for a
    prompt of ``longest_prompt`` tokens)."""
    base, fields = split_settings(spec)
    protect = bool(fields.pop("protect_prompt", False))
    spec = "@".join([base, *(f"{k}={v!r}" for k, v in fields.items())])

    scorer = base.partition(":")[0].partition("+")[2]

    def found(method: str) -> list[Path]:
        """The ``method`` profiles in ``profiles``: those measured under the spec's scorer when it
        names one and any are, else all."""
        paths = sorted(profiles.glob(f"{method}*.json")) if profiles is not None and profiles.is_dir() else []
        if not paths:
            raise SystemExit(f"{spec}: no {method} profiles in {profiles}; write them with recipes/profile_budgets.py "
                             "and pass --profiles FOLDER")  # fmt: skip
        same = [path for path in paths if json.loads(path.read_text()).get("scorer") == scorer]
        if scorer and not same:
            print(f"{spec}: no {method} profile in {profiles} was measured under {scorer!r}; using "
                  f"{', '.join(path.name for path in paths)}", file=sys.stderr)  # fmt: skip
        return same or paths

    policy = make_policy(spec + (f"@sink_tokens={longest_prompt}" if protect else ""), budget, found)
    if not protect:
        return lambda prompts: policy
    return lambda prompts: make_policy(f"{spec}@sink_tokens={max(map(len, prompts))}", budget, found)


def summarize_traces(answers: list[Answer], metrics: dict[int, dict]) -> dict:
    """Means over positions: all, loop-free prefixes and inside loops, per kind and together; and
    per answer (its loop-free prefix), for paired comparisons between policies."""
    groups: dict[str, dict[str, float]] = {}

    def add(group: str, kl: torch.Tensor, agree: torch.Tensor) -> None:
        entry = groups.setdefault(group, {"kl": 0.0, "agreement": 0.0, "positions": 0})
        entry["kl"] += float(kl.sum())
        entry["agreement"] += float(agree.sum())
        entry["positions"] += len(kl)

    per_answer = []
    for row, answer in enumerate(answers):
        values = metrics[row]
        cut = answer.loop_start if answer.loop_start is not None else len(answer.answer_ids)
        for kind in (answer.kind, "all"):
            add(f"{kind} loop-free", values["kl"][:cut], values["agree"][:cut])
            add(f"{kind} in loops", values["kl"][cut:], values["agree"][cut:])
        free_kl = float(values["kl"][:cut].mean()) if cut else None
        free_agree = float(values["agree"][:cut].mean()) if cut else None
        per_answer.append({"kl_loop_free": free_kl, "agreement_loop_free": free_agree})
    for entry in groups.values():
        if entry["positions"]:
            entry["kl"] /= entry["positions"]
            entry["agreement"] /= entry["positions"]
        else:
            entry["kl"] = entry["agreement"] = None
    return {"kl": groups["all loop-free"]["kl"], "agreement": groups["all loop-free"]["agreement"],
            "groups": groups, "per_answer": per_answer}  # fmt: skip


def module_tokens(tokenizer, module: str, count: int) -> tuple[list[int], str]:
    """The first ``count`` + 1 tokens of a standard-library module's source, and its file's name."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise SystemExit(f"--ppl-modules: {module!r} has no Python source file here")
    text = Path(spec.origin).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False).input_ids[: count + 1]
    if len(ids) < count + 1:
        raise SystemExit(f"{spec.origin} has {len(ids)} tokens; --ppl-tokens {count} needs {count + 1}")
    return ids, spec.origin


def perplexity(nll: torch.Tensor, window: int) -> tuple[float, list[float]]:
    """Perplexity of ``nll`` ``[docs, T]`` overall and over each window of ``window`` positions."""
    windows = [float(nll[:, start : start + window].mean().exp()) for start in range(0, nll.shape[1], window)]
    return float(nll.mean().exp()), windows


def first_divergence(tokens: list[int], reference: list[int]) -> int:
    """The first index where ``tokens`` leaves ``reference`` (their common length when it never does)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b),
                min(len(tokens), len(reference)))  # fmt: skip


def loop_rate(outputs: list[list[int]], ends: set[int], span: int) -> tuple[float, list[int | None]]:
    """The fraction of ``outputs`` (cut at their end) that fall into a loop, and where each does."""
    starts = [repetition_start(until_end(tokens, ends), span) for tokens in outputs]
    return sum(start is not None for start in starts) / len(starts), starts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    results = {"benchmark": "fidelity", "settings": settings_key(args), "rows": []}
    if args.out.exists():
        saved = json.loads(args.out.read_text())
        if saved.get("settings") != results["settings"]:
            raise SystemExit(f"{args.out} holds results measured with other settings; pass another --out "
                             f"(its settings: {saved.get('settings')})")  # fmt: skip
        results = saved
    results["environment"] = environment()
    results.setdefault("commands", []).append(shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv))
    run = Run(args, results, *load_pretrained(args.model, getattr(torch, args.dtype), args.device))
    if "traces" in args.parts or "free" in args.parts:
        run.answers = full_cache_answers(run.model, run.tokenizer, args, read_questions(args.data, args.sets))
        results["answers"] = [{"set": a.set, "index": a.index, "kind": a.kind, "prompt_tokens": len(a.prompt_ids),
                               "answer_tokens": a.generated, "loop_start": a.loop_start,
                               "measured_tokens": len(a.answer_ids)} for a in run.answers]  # fmt: skip
        results["mean_answer_tokens"] = sum(len(a.answer_ids) for a in run.answers) / len(run.answers)
        sequences = [len(a.prompt_ids) + len(a.answer_ids) for a in run.answers]
        results["mean_sequence_tokens"] = sum(sequences) / len(sequences)
    for part in args.parts:
        {"traces": measure_traces, "ppl": measure_ppl, "free": measure_free}[part](run)
    write_results(args.out, results)
    print_summary(results)
    plot(results, args.out.with_suffix(".png"))


@dataclass
class Run:
    """One run of the recipe: its arguments, the results so far (written after each configuration),
    the model and tokenizer, and the full cache's answers (traces and free parts)."""

    args: argparse.Namespace
    results: dict
    model: torch.nn.Module
    tokenizer: object
    answers: list[Answer] = field(default_factory=list)

    def record(self, row: dict) -> None:
        self.results["rows"].append(row)
        write_results(self.args.out, self.results)

    def budgets(self, part: str, length: float) -> dict[str, int]:
        """Slots of each budget label in ``part``: ``N%`` of ``length`` (the part's mean sequence),
        recorded in the results."""
        slots = {label: round(float(label[:-1]) / 100 * length) if label.endswith("%") else int(label)
                 for label in self.args.budgets}  # fmt: skip
        self.results.setdefault("budgets", {}).setdefault(part, {}).update(slots)
        return slots

    def configurations(self, part: str, budgets: dict[str, int], prompts: list[list[int]], longest: int):
        """``(spec, label, budget, policy maker)`` for each configuration of ``part`` not measured
        yet; a budget too small for a policy is skipped with a message, and one that holds every
        row whole (``longest`` tokens, and a compacting policy's buffer, in every KV head) is
        recorded as the full cache's ``row`` (`whole_row`) without running: nothing is evicted."""
        done = {(row["part"], row["policy"], row["budget_label"]) for row in self.results["rows"]}
        longest_prompt = max(map(len, prompts))
        layers = self.model.config.num_hidden_layers
        for spec, label in ((spec, label) for spec in self.args.policies for label in budgets):
            if (part, spec, label) in done or (part == "free" and "protect_prompt" in spec):
                continue
            try:
                maker = policy_maker(spec, budgets[label], self.args.profiles, longest_prompt)
            except ValueError as error:  # below the policy's minimum budget
                tqdm.write(f"skip {spec} at {label} ({budgets[label]} slots): {error}")
                continue
            policy = maker(prompts)
            if smallest_head_budget(policy, layers) >= longest + policy.reserve:
                self.record({"part": part, "policy": spec, "budget_label": label, "budget": budgets[label],
                             "holds_everything": True, **self.whole_row(part)})  # fmt: skip
                continue
            yield spec, label, budgets[label], maker

    def whole_row(self, part: str) -> dict:
        """The results of a cache that evicts nothing in ``part``: the full cache's."""
        full = next(r for r in self.results["rows"] if r["part"] == part and r["policy"] == "full")
        if part == "traces":
            return {"kl": 0.0, "agreement": 1.0}
        if part == "ppl":
            return {"ppl": full["ppl"], "ppl_by_position": full["ppl_by_position"]}
        count, tokens = len(full["outputs"]), self.args.free_tokens
        return {"first_divergence": [tokens] * count, "median_first_divergence": tokens, "identical": 1.0,
                "looping": full["looping"], "loop_starts": full["loop_starts"]}  # fmt: skip

    def has(self, part: str) -> bool:
        return any(r["part"] == part and r["policy"] == "full" for r in self.results["rows"])


def smallest_head_budget(policy: longflow_patch.Policy, layers: int) -> int:
    """The fewest live slots any KV head of any layer has under ``policy``."""
    return min(min(policy.head_limits(layer) or [policy.layer_slots(layer)]) for layer in range(layers))


def measure_traces(run: Run) -> None:
    """The ``traces`` part: every configuration teacher-forced on the full cache's answers."""
    args, answers, model = run.args, run.answers, run.model
    pad_id = run.tokenizer.pad_token_id
    prompts, traces = [a.prompt_ids for a in answers], [a.answer_ids for a in answers]
    budgets = run.budgets("traces", run.results["mean_sequence_tokens"])
    if not run.has("traces"):
        loops = [a.loop_start is not None for a in answers]
        run.record({"part": "traces", "policy": "full", "budget_label": "full", "budget": None, "kl": 0.0,
                    "agreement": 1.0, "looping_answers": sum(loops) / len(loops)})  # fmt: skip
    longest = max(map(len, prompts)) + max(map(len, traces))
    todo = list(run.configurations("traces", budgets, prompts, longest))
    if not todo:
        return
    batches = reference_batches(model, pad_id, prompts, traces, args.batch_size)
    for spec, label, budget, maker in tqdm(todo, desc="traces: configurations", unit="config"):
        used = split_batches(batches) if "protect_prompt" in spec else batches
        with tqdm(total=sum(map(len, traces)), desc=f"{spec} {label}", unit="tok", leave=False) as bar:
            metrics = teacher_forced(model, used, pad_id, maker, bar)
        row = {"part": "traces", "policy": spec, "budget_label": label, "budget": budget,
               **summarize_traces(answers, metrics)}  # fmt: skip
        run.record(row)
        tqdm.write(f"traces {spec:>24} {label:>4} ({budget:>4} slots): KL {row['kl']:.4f} "
                   f"agreement {row['agreement']:.3f} (loop-free positions)")  # fmt: skip


def measure_ppl(run: Run) -> None:
    """The ``ppl`` part: perplexity of the standard-library sources under every configuration."""
    args, model = run.args, run.model
    pad_id = run.tokenizer.pad_token_id
    documents = [module_tokens(run.tokenizer, module, args.ppl_tokens) for module in args.ppl_modules]
    ids = [tokens for tokens, _ in documents]
    run.results["ppl_documents"] = [{"module": module, "file": file, "sha256": sha256(str(t).encode()).hexdigest()}
                                    for module, (t, file) in zip(args.ppl_modules, documents, strict=True)]  # fmt: skip
    prompts, traces = [t[:1] for t in ids], [t[1:] for t in ids]
    budgets = run.budgets("ppl", args.ppl_tokens)
    batches = reference_batches(model, pad_id, prompts, traces, args.batch_size)
    if not run.has("ppl"):
        nll = torch.stack([metrics["nll_reference"] for metrics in full_metrics(model, batches).values()])
        overall, windows = perplexity(nll, args.ppl_window)
        run.record({"part": "ppl", "policy": "full", "budget_label": "full", "budget": None, "ppl": overall,
                    "ppl_by_position": windows})  # fmt: skip
    todo = list(run.configurations("ppl", budgets, prompts, args.ppl_tokens + 1))
    for spec, label, budget, maker in tqdm(todo, desc="ppl: configurations", unit="config"):
        used = split_batches(batches) if "protect_prompt" in spec else batches
        with tqdm(total=len(ids) * args.ppl_tokens, desc=f"{spec} {label}", unit="tok", leave=False) as bar:
            metrics = teacher_forced(model, used, pad_id, maker, bar)
        overall, windows = perplexity(torch.stack([metrics[row]["nll"] for row in range(len(ids))]), args.ppl_window)
        run.record({"part": "ppl", "policy": spec, "budget_label": label, "budget": budget, "ppl": overall,
                    "ppl_by_position": windows})  # fmt: skip
        tqdm.write(f"ppl {spec:>24} {label:>4} ({budget:>4} slots): perplexity {overall:.3f}")


def measure_free(run: Run) -> None:
    """The ``free`` part: greedy generation under every configuration against the full cache's."""
    args, model, tokenizer = run.args, run.model, run.tokenizer
    ends = end_ids(model, tokenizer)
    prompts = [a.prompt_ids for a in run.answers if a.kind == "greedy"][: args.free_prompts]
    budgets = run.budgets("free", run.results["mean_sequence_tokens"])

    def generated(policy_for: Callable, desc: str) -> list[list[int]]:
        outputs = []
        with tqdm(total=len(prompts) * args.free_tokens, desc=desc, unit="tok", leave=False) as bar:
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start : start + args.batch_size]
                longflow_patch.apply(model, policy=policy_for(batch))
                outputs += generate(model, tokenizer, batch, args.free_tokens, bar)
        longflow_patch.unapply(model)
        return outputs

    longest = max(map(len, prompts)) + args.free_tokens
    if not run.has("free"):
        full = longflow_patch.make_policy("full", budget=longest)  # holds everything
        outputs = generated(lambda batch: full, "free: full cache")
        rate, starts = loop_rate(outputs, ends, args.loop_span)
        run.record({"part": "free", "policy": "full", "budget_label": "full", "budget": None, "looping": rate,
                    "loop_starts": starts, "outputs": outputs})  # fmt: skip
    reference = next(r for r in run.results["rows"] if r["part"] == "free" and r["policy"] == "full")["outputs"]
    todo = list(run.configurations("free", budgets, prompts, longest))
    for spec, label, budget, maker in tqdm(todo, desc="free: configurations", unit="config"):
        outputs = generated(maker, f"{spec} {label}")
        divergence = [first_divergence(o, r) for o, r in zip(outputs, reference, strict=True)]
        rate, starts = loop_rate(outputs, ends, args.loop_span)
        run.record({"part": "free", "policy": spec, "budget_label": label, "budget": budget,
                    "first_divergence": divergence, "median_first_divergence": median(divergence),
                    "identical": sum(d == args.free_tokens for d in divergence) / len(divergence), "looping": rate,
                    "loop_starts": starts})  # fmt: skip
        tqdm.write(f"free {spec:>24} {label:>4} ({budget:>4} slots): median first divergence "
                   f"{median(divergence):.0f}, looping {rate:.2f}")  # fmt: skip


def merge(paths: list[Path], out: Path) -> None:
    """Combine results files measured with one setting (runs split by part or policy) into ``out``,
    and plot it; a configuration measured in several files keeps the last file's row."""
    files = [json.loads(path.read_text()) for path in paths]
    for path, results in zip(paths, files, strict=True):
        if results["settings"] != files[0]["settings"]:
            raise SystemExit(f"{path} was measured with other settings than {paths[0]}")
    merged = {key: value for results in files for key, value in results.items() if key not in ("rows", "budgets")}
    rows, budgets = {}, {}
    for results in files:
        rows |= {(row["part"], row["policy"], row["budget_label"]): row for row in results["rows"]}
        for part, slots in results.get("budgets", {}).items():
            budgets.setdefault(part, {}).update(slots)
    commands = [command for results in files for command in results.get("commands", [])]
    merged |= {"rows": list(rows.values()), "budgets": budgets, "commands": list(dict.fromkeys(commands)),
               "merged_from": [str(path) for path in paths]}  # fmt: skip
    write_results(out, merged)
    print_summary(merged)
    plot(merged, out.with_suffix(".png"))


def full_metrics(model, batches: list[Batch]) -> dict[int, dict]:
    """The full cache's own metrics by row (`position_metrics` of the reference against itself)."""
    lm_head, metrics = model.get_output_embeddings(), {}
    for batch in batches:
        with torch.no_grad():
            values = position_metrics(lm_head, batch.reference, batch.reference, batch.targets, batch.mask)
        for slot, row in enumerate(batch.rows):
            metrics[row] = {name: value[slot, : len(batch.traces[slot])] for name, value in values.items()}
    return dict(sorted(metrics.items()))


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return float(ordered[middle]) if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def print_summary(results: dict) -> None:
    """One table: each policy and budget's KL and agreement (loop-free), perplexity and free-running figures."""
    table = {}
    for row in results["rows"]:
        entry = table.setdefault((row["policy"], row["budget_label"]), {"policy": row["policy"],
                                                                        "budget": row["budget_label"]})  # fmt: skip
        if row["part"] == "traces":
            entry |= {"KL": row["kl"], "agreement": row["agreement"]}
        elif row["part"] == "ppl":
            entry["perplexity"] = row["ppl"]
        else:
            entry |= {"first divergence": row.get("median_first_divergence"), "looping": row["looping"]}
    print_table(list(table.values()), ["policy", "budget", "KL", "agreement", "perplexity", "first divergence",
                                       "looping"])  # fmt: skip


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    figure, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    (kl_axis, agreement_axis, divergence_axis), (ppl_axis, *position_axes) = axes
    tab20 = plt.get_cmap("tab20").colors
    colors = [*tab20[0::2], *tab20[1::2]]
    policies = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"))
    style = {policy: {"color": colors[i % 20], "marker": "o", "label": policy,
                      "linestyle": "--" if ":" in policy or "@" in policy else "-"}
             for i, policy in enumerate(policies)}  # fmt: skip

    def points(part: str, policy: str) -> list[dict]:
        found = [r for r in rows if r["part"] == part and r["policy"] == policy]
        return sorted(found, key=lambda r: r["budget"])

    for policy in policies:
        traces = [r for r in points("traces", policy) if r["kl"] is not None]
        if traces:
            budgets = [r["budget"] for r in traces]
            kl_axis.plot(budgets, [max(r["kl"], 1e-6) for r in traces], **style[policy])
            agreement_axis.plot(budgets, [r["agreement"] for r in traces], **style[policy])
        if free := points("free", policy):
            divergence_axis.plot([r["budget"] for r in free], [r["median_first_divergence"] for r in free],
                                 **style[policy])  # fmt: skip
        if ppl := points("ppl", policy):
            ppl_axis.plot([r["budget"] for r in ppl], [r["ppl"] for r in ppl], **style[policy])
    full_ppl = next((r for r in rows if r["part"] == "ppl" and r["policy"] == "full"), None)
    answers = (f"KV budget (slots; mean prompt + answer {results.get('mean_sequence_tokens', 0):.0f} tokens, "
               f"answer {results.get('mean_answer_tokens', 0):.0f})")  # fmt: skip
    documents = f"KV budget (slots; documents of {results['settings']['ppl_tokens']} tokens)"
    for axis, label, unit in ((kl_axis, "mean KL(full || policy) per token, loop-free positions", answers),
                              (agreement_axis, "top-1 agreement with the full cache, loop-free positions", answers),
                              (divergence_axis, "free-running: median first position leaving the full cache", answers),
                              (ppl_axis, "perplexity, standard-library sources", documents)):  # fmt: skip
        axis.set_xscale("log", base=2)
        axis.set_xlabel(unit)
        axis.set_ylabel(label, fontsize=9)
        axis.grid(alpha=0.3)
    kl_axis.set_yscale("log")
    ppl_axis.set_yscale("log")
    if full_ppl is not None:
        ppl_axis.axhline(full_ppl["ppl"], color="black", linestyle="--", label="full cache")
    # Perplexity against position at two budgets: 10% and 20% when measured, else the first two.
    measured = list(dict.fromkeys(r["budget_label"] for r in rows if r["part"] == "ppl" and r["policy"] != "full"))
    labels = [label for label in ("10%", "20%") if label in measured] or measured[:2]
    window = results["settings"]["ppl_window"]
    for axis, label in zip(position_axes, labels, strict=False):
        for policy in policies:
            row = next((r for r in rows if r["part"] == "ppl" and r["policy"] == policy and r["budget_label"] == label),
                       None)  # fmt: skip
            if row is not None:
                axis.plot([window * (i + 1) for i in range(len(row["ppl_by_position"]))], row["ppl_by_position"],
                          **style[policy] | {"marker": None})  # fmt: skip
        if full_ppl is not None:
            axis.plot([window * (i + 1) for i in range(len(full_ppl["ppl_by_position"]))], full_ppl["ppl_by_position"],
                      color="black", linestyle="--", label="full cache")  # fmt: skip
        axis.set_yscale("log")
        axis.set_xlabel("position in the document (end of each window)")
        axis.set_ylabel(f"perplexity at budget {label} ({results['budgets']['ppl'][label]} slots)", fontsize=9)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    handles, names = [], []
    for axis in axes.flat:
        for handle, name in zip(*axis.get_legend_handles_labels(), strict=True):
            if name not in names:
                handles.append(handle)
                names.append(name)
    figure.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


if __name__ == "__main__":
    main()
