"""What the decode kernels compile to for an H100 (sm_90), checked on any machine: `bench/kernel_ptx.py`
compiles them as the JIT would specialize them at launch, without a GPU. It guards properties the
GPU benchmarks rest on and the interpreter cannot see."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longflow_patch.kernels.decode_attention_reference import STORED_LOGIT_DTYPE

pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend compiles the kernels")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def throughput_row_kernels(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """The 8B throughput row at 8k (batch 64, 1,740 slots, shared eviction) as planned on 132 SMs, by
    kernel and what the op does to the new token first: nothing, or Qwen3's q/k norms and RoPE (what
    a Qwen3 step runs on a GPU)."""
    out = tmp_path_factory.mktemp("ptx") / "kernel_ptx.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(REPO / "bench" / "kernel_ptx.py"), "--batch", "64", "--slots", "1740",
                    "--sms", "132", "--target", "cuda:90", "--out", str(out)],
                   cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
    return {(row["kernel"], row["preparation"]): row for row in json.loads(out.read_text())["rows"]}


def test_scoring_pass_loads_logits_sixteen_bytes_at_a_time(throughput_row_kernels):
    """A tile of 4096 logits over 128 threads is 64 bytes a thread in fp16 (`STORED_LOGIT_DTYPE`; 128
    in float32, before 2026-12-07): 4 loads of 16 bytes. With a mask per slot (before 2026-12-06)
    Triton issued every logit as its own load."""
    bytes_per_thread = 4096 * STORED_LOGIT_DTYPE.itemsize // 128
    assert throughput_row_kernels["_score_merge_kernel", "qwen3"]["ld_v4"] >= bytes_per_thread // 16


def test_decode_kernels_do_not_spill(throughput_row_kernels):
    """The attention pass holds its accumulator, query tile and online-softmax state in about 250
    registers a thread: close to the 255 a thread can have, past which it would spill to local memory.
    Normalising and rotating the new query and key first must not push it over."""
    kernels = {"_attend_split_kernel", "_score_merge_kernel"}
    assert set(throughput_row_kernels) == {(kernel, prepared) for kernel in kernels for prepared in ("none", "qwen3")}
    for (name, preparation), row in throughput_row_kernels.items():
        assert row["local_bytes"] == 0, (
            f"{name} ({preparation}) spills {row['local_bytes']} bytes a thread ({row['registers']} registers)"
        )
