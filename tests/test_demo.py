"""The README's main job, ``python -m longflow_patch.demo``, end to end on the CPU (one short problem)."""

import subprocess
import sys


def test_demo_solves_a_problem_with_the_full_cache_and_reports_both_policies():
    command = [sys.executable, "-m", "longflow_patch.demo", "--problems", "1", "--blocks", "1", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[-2:]}
    assert set(rows) == {"full", "longflow"}
    assert rows["full"][0] == "100.00%"  # the bundled toy reasoner solves it with a full cache
    assert float(rows["longflow"][2]) < float(rows["full"][2])  # a smaller KV cache than the full one
