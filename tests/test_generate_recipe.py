"""``recipes/generate.py``: sharded generation to one JSON-lines file, resumable, on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_loader import load_recipe
from test_eval_lm_eval import OFFLINE, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "generate.py"
PROMPTS = [
    {"id": "a", "prompt": "What is 1+1?"},
    {"prompt": "no id: the line number is the id"},
    {"id": 7, "prompt": "x"},
    {"id": "z", "prompt": "a longer prompt, generated in the first batch"},
    {"id": "q", "prompt": "Name a prime."},
]
GREEDY = ["--budget", "16", "--max-new-tokens", "4", "--temperature", "0"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("generate.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return prompts, tmp_path / "out" / "completions.jsonl"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_help(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--budget" in capsys.readouterr().out


def test_policy_settings(recipe):
    required = ["--model", "m", "--prompts", "p", "--out", "o"]
    args = recipe.parse_args([*required, "--policy", "snapkv", "--budget", "64", "--setting", "buffer=16"])
    assert recipe.settings(args) == {"budget": 64, "buffer": 16}
    args = recipe.parse_args([*required, "--policy", "h2o", "--setting", "recent_window=6"])  # an optional int
    assert recipe.settings(args) == {"budget": 2048, "recent_window": 6}
    args = recipe.parse_args([*required, "--setting", "buffer=16"])
    with pytest.raises(SystemExit, match="no setting 'buffer'"):
        recipe.settings(args)


def test_generates_in_input_order_and_resumes(recipe, checkpoint, files, monkeypatch):
    prompts, out = files
    argv = ["--model", str(checkpoint), "--prompts", str(prompts), "--out", str(out), "--batch-size", "2", *GREEDY]
    real_generate_batch = recipe.generate_batch
    batches = []

    def interrupted_after_one_batch(model, tokenizer, rows, args, progress):
        if batches:
            raise KeyboardInterrupt
        batches.append([row["id"] for row in rows])
        return real_generate_batch(model, tokenizer, rows, args, progress)

    monkeypatch.setattr(recipe, "generate_batch", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(argv)
    part = out.with_name(out.name + ".parts") / "rank-0.jsonl"
    first = read(part)
    assert [row["id"] for row in first] == batches[0] == ["z", 1]  # longest prompts first
    assert not out.exists()
    with part.open("a") as handle:  # killed while writing a line
        handle.write('{"id": "a", "prompt": "What is 1+1?", "compl')

    resumed = []

    def counting(model, tokenizer, rows, args, progress):
        resumed.extend(row["id"] for row in rows)
        return real_generate_batch(model, tokenizer, rows, args, progress)

    monkeypatch.setattr(recipe, "generate_batch", counting)
    recipe.main(argv)
    assert sorted(map(str, resumed)) == ["7", "a", "q"]  # nothing done twice, nothing lost
    results = read(out)
    assert [row["id"] for row in results] == ["a", 1, 7, "z", "q"]
    assert [row["prompt"] for row in results] == [row["prompt"] for row in PROMPTS]
    assert all(isinstance(row["completion"], str) and 0 < row["new_tokens"] <= 4 for row in results)
    assert {row["id"]: row for row in results}["z"] == first[0]
    assert not part.parent.exists()  # merged, then removed

    def must_not_run(*args):
        raise AssertionError("nothing is left to do")

    monkeypatch.setattr(recipe, "load_model", must_not_run)
    before = out.read_text()
    recipe.main(argv)
    assert out.read_text() == before


def test_two_processes(recipe, checkpoint, files, tmp_path):
    """``accelerate launch`` with two CPU processes (accelerate's ``--cpu`` launches only one
    process without MPI, so the processes are spawned with its torchrun launcher)."""
    prompts, out = files
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    arguments = ["--model", str(checkpoint), "--prompts", str(prompts), *GREEDY]
    env = {**os.environ, **OFFLINE, "CUDA_VISIBLE_DEVICES": ""}
    command = [*launch, str(SCRIPT), *arguments, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 1/2" in result.stderr and "process 2/2" in result.stderr
    single = tmp_path / "single.jsonl"
    recipe.main([*arguments, "--out", str(single), "--device-map", "auto"])  # one process, greedy: the same
    assert read(out) == read(single)
