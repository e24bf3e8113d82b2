"""A small reasoning model of our own, to measure accuracy under KV-cache compression.

It is trained from scratch on the table-walk task of `longflow_patch.toy.task` (chains of thought
of 1k-4k tokens that must recall facts from far back) by ``recipes/train_toy_reasoner.py``::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from longflow_patch import toy

    model = AutoModelForCausalLM.from_pretrained(toy.model_path())
    tokenizer = AutoTokenizer.from_pretrained(toy.model_path())
    problems = toy.make_problems(32, seed=0)
    ...
    toy.is_correct(completion, problems[0]["answer"])
"""

from pathlib import Path

from longflow_patch.toy.config import model_config
from longflow_patch.toy.task import Problem, blocks_solved, is_correct, make_problems, parse_answer, parse_prompt, solve
from longflow_patch.toy.tokenizer import build_tokenizer

MODEL_DIR = Path(__file__).parent / "model"
DRAFT_DIR = Path(__file__).parent / "draft"
GLIDE_DIR = Path(__file__).parent / "glide"
TRAIN_COMMAND = "python recipes/train_toy_reasoner.py --device cuda"
DRAFT_TRAIN_COMMAND = (
    "python recipes/train_toy_reasoner.py --device cuda --layers 2 --steps 3000 --warmup-steps 200 "
    "--eval-problems 0 --out longflow_patch/toy/draft --checkpoint-dir checkpoints/toy_draft"
)


GLIDE_TRAIN_COMMAND = (
    "python recipes/train_glide_draft.py --target toy --steps 300 --threads 2 --out longflow_patch/toy/glide "
    "--checkpoint-dir checkpoints/glide_toy"
)


def _trained(directory: Path, name: str, command: str) -> Path:
    """``directory`` when it holds ``model.safetensors``; else FileNotFoundError naming ``command``."""
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the {name}'s weights ({directory / 'model.safetensors'}) are not there yet; "
            f"train them with `{command}`, which writes them into that directory"
        )
    return directory


def model_path() -> Path:
    """The bundled model directory (weights, config, tokenizer), for ``from_pretrained``.

    Raises FileNotFoundError while the trained weights are absent.
    """
    return _trained(MODEL_DIR, "toy reasoner", TRAIN_COMMAND)


def profile_paths(method: str) -> tuple[Path, ...]:
    """The toy reasoner's bundled budget profiles of ``method`` (``"lukv"`` or ``"reasonalloc"``),
    one per operating point they were measured at (``recipes/profile_budgets.py``): pass them all
    as ``profile=`` and the policy solves with the one nearest its budget. They were measured under
    R-KV (their ``scorer``), so a policy given them runs over R-KV unless told otherwise."""
    paths = tuple(sorted((model_path() / "profiles").glob(f"{method}*.json")))
    if not paths:
        raise ValueError(f"no bundled {method!r} profiles in {model_path() / 'profiles'}")
    return paths


def draft_path() -> Path:
    """The bundled draft model for speculative decoding: the toy reasoner's task and tokenizer in
    2 layers (1.15M parameters), trained by ``DRAFT_TRAIN_COMMAND`` (about 110 s on one H100;
    log in ``bench/results/train_toy_draft_L2.log``).

    Raises FileNotFoundError while its weights are absent.
    """
    return _trained(DRAFT_DIR, "toy draft", DRAFT_TRAIN_COMMAND)


def glide_path() -> Path:
    """The bundled GLIDE draft for speculative decoding (`longflow_patch.load_glide_draft`): one
    layer over the toy reasoner's last-layer cache, trained with anchor-offset positions by
    ``GLIDE_TRAIN_COMMAND`` on a 2-core CPU (log in ``bench/results/train_glide_draft_toy.log``).

    Raises FileNotFoundError while its weights are absent.
    """
    return _trained(GLIDE_DIR, "toy GLIDE draft", GLIDE_TRAIN_COMMAND)


__all__ = [
    "DRAFT_DIR",
    "GLIDE_DIR",
    "MODEL_DIR",
    "Problem",
    "blocks_solved",
    "build_tokenizer",
    "draft_path",
    "glide_path",
    "is_correct",
    "make_problems",
    "model_config",
    "model_path",
    "parse_answer",
    "parse_prompt",
    "profile_paths",
    "solve",
]
