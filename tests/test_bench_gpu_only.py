"""The GPU-only benchmarks say so: in ``--help``, and on a machine without CUDA in one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
GPU_ONLY = [
    "decode_op.py",
    "eager_host.py",
    "kernel_ab.py",
    "kernel_ablation.py",
    "ncu_step.py",
    "ragged_decode.py",
    "ragged_overhead.py",
    "stop_check.py",
]


@pytest.mark.parametrize("script", GPU_ONLY)
def test_help_says_gpu_only(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GPU only: needs a CUDA device." in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without CUDA sees")
@pytest.mark.parametrize("script", GPU_ONLY)
def test_without_cuda_one_line_error(script):
    done = subprocess.run([sys.executable, str(BENCH / script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"{script}: GPU only: no CUDA device here (this benchmark times CUDA kernels)\n"
