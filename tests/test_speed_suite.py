"""``bench/speed_suite.py --smoke``: every part runs end to end on the CPU, and a run whose budget
skips every row still prints its summary and exits cleanly (it crashed there on the H200)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "speed_suite.py"
sys.path.insert(0, str(SCRIPT.parent))
import speed_suite  # noqa: E402


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LONGFLOW_DIRECT_LAUNCH": "0"}  # part a times direct launches all the same
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], capture_output=True, text=True, env=env)


def test_smoke_run_measures_every_part(tmp_path):
    done = run("--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    throughput = json.loads((tmp_path / "throughput_tiny_cpu.json").read_text())
    measured = {row["config"] for row in throughput["rows"] if "tokens_per_s" in row}
    assert measured >= {"fullcache-loop", "longflow-compiled"}
    # every compiled row says how many of its graphs inductor would not capture (none asked on a CPU)
    compiled = [row for row in throughput["rows"] if row["config"] in ("fullcache-loop", "longflow-loop", "static")]
    assert compiled and all(row["cudagraph_skips"] == 0 for row in compiled if "tokens_per_s" in row)
    # part a timed direct launches; the throughput rows after it run with the process's setting
    assert throughput["environment"]["longflow_direct_launch"] is False
    assert json.loads((tmp_path / "profile_step_tiny_cpu.json").read_text())["profiles"]
    assert "README table" in done.stdout


def test_a_budget_too_small_for_any_row_still_prints_the_summary(tmp_path):
    done = run("--budget-s", "1", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "throughput_tiny_cpu.json").read_text())["rows"]
    assert rows and all("tokens_per_s" not in row and "skipped" in row for row in rows)
    assert "not measured: " in done.stdout and "README table" in done.stdout


@pytest.mark.parametrize(
    "name, tag",
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
     ("NVIDIA GeForce RTX 4090", "4090")],
)  # fmt: skip
def test_results_are_named_after_the_cards_model(name, tag):
    """The H100 run had written its files as ``*_hbm3`` (the device name's last word)."""
    assert speed_suite.device_tag(name) == tag
