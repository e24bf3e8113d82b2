"""``bench/kernel_ablation.py``'s source edits still match the kernel file once each (an edit that
stopped matching would time the unedited op under another name), and its exact ablations give the
op's step under the interpreter, ragged rows and several splits included."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from longflow_patch.kernels import decode_attention

import decode_op
import kernel_ablation


@pytest.mark.parametrize("name", sorted(kernel_ablation.ABLATIONS))
def test_edits_match_the_kernel_file_once(name):
    source = kernel_ablation.KERNEL_FILE.read_text()
    edited = kernel_ablation.edited_source(kernel_ablation.ABLATIONS[name], source)
    assert edited != source
    compile(edited, name, "exec")


def test_an_edit_that_no_longer_matches_is_an_error():
    with pytest.raises(ValueError, match="matches 0 times"):
        kernel_ablation.edited_source(kernel_ablation.Ablation((("no such line", ""),)), "source")


@pytest.mark.parametrize("name", [name for name, ablation in kernel_ablation.ABLATIONS.items() if ablation.exact])
@pytest.mark.parametrize(("n_splits", "preparation"), [(1, "qwen3"), (3, "none")])
def test_exact_ablations_give_the_op_step(name, n_splits, preparation, tmp_path, monkeypatch):
    monkeypatch.setattr(decode_op, "device", lambda: "cpu")
    module = kernel_ablation.load_ablation(name, tmp_path)
    inputs = decode_op.make_inputs(2, 300, preparation=preparation)
    inputs["slot_limit"][0] = 243  # a ragged row: its last tile runs past the limit
    inputs["slot_pos"][0, :, 243:] = -1
    inputs["slot_pos"][1, :, :5] = -1  # empty slots
    steps = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()} for _ in range(2)]
    expected = decode_attention.decode_attention_triton(**steps[0], **decode_op.SETTINGS, n_splits=n_splits)
    got = module.decode_attention_triton(**steps[1], **decode_op.SETTINGS, n_splits=n_splits)
    assert torch.equal(got, expected)
    assert torch.equal(steps[1]["write_slot"], steps[0]["write_slot"])
