"""Evaluation with lm-evaluation-harness: the ``longflow_hf`` model, reasoning tasks, math grading.

    pip install "longflow-patch[eval]"
    TASKS=$(python -c "import longflow_patch.eval as e; print(e.tasks_dir())")
    lm_eval --model longflow_hf --model_args pretrained=PATH,policy=longflow,budget=2048 \\
        --tasks longflow_reasoning --include_path "$TASKS" --metadata data_dir=/path/to/reasoning \\
        --apply_chat_template

``longflow_hf`` is registered with lm-eval automatically (`longflow_patch.eval.hook`); the
``longflow-lm-eval`` command is the same command line with the registration done explicitly.
The reasoning tasks read local JSON-lines files (``LONGFLOW_DATA_DIR`` or ``--metadata
data_dir=...``); see `tasks_dir`'s ``README.md``.
"""

from pathlib import Path


def tasks_dir() -> str:
    """The folder of this package's lm-eval task files, to pass as ``--include_path``."""
    return str(Path(__file__).with_name("tasks"))
