"""``recipes/bench_speculative.py --smoke``: the benchmark runs end to end on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "bench_speculative.py"


def test_smoke_run_writes_results(tmp_path):
    out = tmp_path / "speculative.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {"device", "torch", "transformers", "triton"} <= set(results["environment"])
    toy = [row for row in results["rows"] if row["part"] == "toy" and row["config"] == "speculative"]
    assert {row["draft"] for row in toy} == {"self", "toy", "glide", "glide-tree"}
    assert all(row["identical"] for row in toy)
    assert next(row for row in toy if row["draft"] == "glide-tree")["tree"] == "2x2"
    assert [row for row in results["rows"] if row["part"] == "verify"]
    cost = [row for row in results["rows"] if row["part"] == "cost"]
    assert [row["draft"] for row in cost] == ["chain", "tree"] and all(row["round_ms"] > 0 for row in cost)
