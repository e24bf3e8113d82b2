"""The functions this folder's task files name (``!function utils.NAME``).

Reasoning tasks read ``{"index", "question", "true_answer"}`` JSON lines from a local folder: the
``data_dir`` metadata (``--metadata data_dir=PATH``) or else the ``LONGFLOW_DATA_DIR`` environment
variable. Nothing is ever downloaded. The toy task draws its problems from `longflow_patch.toy`.
"""

import json
import os
from pathlib import Path

import datasets

from longflow_patch.eval.grading import score

DATA_DIR_VARIABLE = "LONGFLOW_DATA_DIR"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def load_reasoning(data_file: str, data_dir: str | None = None, **metadata: object) -> dict[str, datasets.Dataset]:
    """``custom_dataset`` of the reasoning tasks: the test split read from ``data_dir/data_file``.

    ``data_file`` comes from the task's ``dataset_kwargs``; ``metadata`` (the task's metadata,
    ``--metadata`` and the model arguments, as lm-eval passes them) is otherwise unused.
    """
    folder = data_dir or os.environ.get(DATA_DIR_VARIABLE)
    if not folder:
        raise FileNotFoundError(
            f"the reasoning tasks read local JSON-lines files: set {DATA_DIR_VARIABLE}=FOLDER or pass "
            f"--metadata data_dir=FOLDER (the folder holding {data_file})"
        )
    path = Path(folder).expanduser() / data_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (data folder from data_dir or {DATA_DIR_VARIABLE})")
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            row = json.loads(line)
            rows.append(
                {
                    "index": int(row.get("index", line_number)),
                    "question": str(row["question"]),
                    "true_answer": str(row["true_answer"]),
                }
            )
    return {"test": datasets.Dataset.from_list(rows)}


def reasoning_prompt(doc: dict) -> str:
    """The user message: the question, then the step-by-step, boxed-answer instruction."""
    return f"{doc['question']}\n{INSTRUCTION}"


def process_reasoning(doc: dict, results: list[str]) -> dict[str, float]:
    r"""``exact_match``: 1 when the completion's last ``\boxed{...}`` is equivalent to the answer."""
    return {"exact_match": float(score(results[0], doc["true_answer"]))}


def load_toy(
    toy_problems: int = 100, toy_seed: int = 0, toy_blocks: str | int | None = None, **metadata: object
) -> dict[str, datasets.Dataset]:
    """``custom_dataset`` of ``longflow_toy``: ``toy_problems`` problems drawn with ``toy_seed``;
    ``toy_blocks`` (``N`` or ``LOW-HIGH``, about 650 tokens of chain of thought per block) sets their
    length, by default the toy task's own range."""
    from longflow_patch import toy

    lengths = {}
    if toy_blocks is not None:
        low, _, high = str(toy_blocks).partition("-")
        lengths["blocks"] = (int(low), int(high or low))
    problems = toy.make_problems(int(toy_problems), int(toy_seed), **lengths)
    return {"test": datasets.Dataset.from_list(problems)}


def toy_prompt(doc: dict) -> str:
    """The toy problem's prompt, as the toy reasoner was trained on it (no chat template)."""
    return doc["prompt"]


def process_toy(doc: dict, results: list[str]) -> dict[str, float]:
    """``exact_match``: 1 when the completion's final answer line is the problem's answer."""
    from longflow_patch import toy

    return {"exact_match": float(toy.is_correct(results[0], doc["answer"]))}
