"""``bench/decode_op.py``'s inputs reach the registered op in its argument order, the new token's
tables and norm weights included (the benchmark and `bench/ncu_step.py` call it positionally)."""

import sys
from pathlib import Path

import pytest
import torch

import longflow_patch  # noqa: F401  (registers the op)
from longflow_patch.kernels.decode_attention_reference import decode_attention_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decode_op


def copies(inputs: dict) -> dict:
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


@pytest.mark.parametrize("preparation", ["none", "rope", "qwen3"])
def test_op_arguments_give_the_reference_step(preparation, monkeypatch):
    monkeypatch.setattr(decode_op, "device", lambda: "cpu")
    inputs = decode_op.make_inputs(2, 24, preparation=preparation)
    if preparation == "qwen3":  # weights other than ones, so that a swapped or dropped weight shows
        inputs["q_norm_weight"] = torch.rand_like(inputs["q_norm_weight"]) + 0.5
    theirs, ours = copies(inputs), copies(inputs)
    expected = decode_attention_reference(**theirs, **decode_op.SETTINGS)
    got = torch.ops.longflow.decode_attention(*decode_op.op_arguments(ours))
    assert torch.equal(got, expected)
    for name in ("k_cache", "v_cache", "slot_pos", "write_slot"):
        assert torch.equal(ours[name], theirs[name]), name
    if preparation != "none":  # the tables were used: without them the step differs
        plain = {key: value for key, value in copies(inputs).items() if key not in decode_op.PREPARATION_KEYS}
        assert not torch.equal(decode_attention_reference(**plain, **decode_op.SETTINGS), expected)
