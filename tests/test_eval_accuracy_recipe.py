"""CPU smoke run of the accuracy harness (recipes/eval_accuracy.py) on the bundled toy reasoner."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_accuracy_harness_smoke_run(tmp_path):
    out = tmp_path / "accuracy.json"
    command = [sys.executable, str(ROOT / "recipes" / "eval_accuracy.py"), "--problems", "2", "--blocks", "1", "1",
               "--policies", "streamingllm", "--budgets", "25%", "--kl-problems", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, cwd=tmp_path, timeout=900)
    result = json.loads(out.read_text())
    full, streaming = result["rows"]
    assert full["policy"] == "full" and full["kl"] == 0.0
    assert streaming["policy"] == "streamingllm" and streaming["budget"] == round(0.25 * result["mean_trace_tokens"])
    assert 0.0 <= streaming["accuracy"] <= 1.0 and streaming["ci"][0] <= streaming["accuracy"] <= streaming["ci"][1]
    assert streaming["kl"] > 0.0, "evicting three quarters of the trace must change the next-token distributions"
    assert out.with_suffix(".png").is_file()
