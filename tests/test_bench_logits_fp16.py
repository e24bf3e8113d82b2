"""``bench/logits_fp16_choices.py``: it sees every decode step's choice, replicates the reference's
(fp16 logits), and finds the choices float32 logits would make otherwise."""

import sys
from pathlib import Path

import pytest
import torch

from models import HEAD_LAYOUTS, left_padded_prompts, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import logits_fp16_choices as choices

from longflow_patch.kernels.decode_attention_reference import ScoreKind


@pytest.mark.parametrize(("arch", "heads"), [("qwen3", "gqa"), ("llama", "mqa")])
@pytest.mark.parametrize("policy", ["longflow", "longflow:per_head"])
def test_every_decode_step_is_recorded_and_its_fp16_choice_is_the_reference(arch, heads, policy):
    model = tiny_model(arch, heads, layers=2)
    ids, mask = left_padded_prompts(batch=3, length=24)
    new_tokens = 12
    # The recorder raises if its fp16 recomputation does not give the reference's write slot.
    row = choices.choice_changes(model, ids, mask, 0, policy, budget=16, new_tokens=new_tokens)
    scopes = 1 if policy == "longflow" else HEAD_LAYOUTS[heads][1]
    assert row["decisions"] == (new_tokens - 1) * 2 * ids.shape[0] * scopes  # steps x layers x rows x scopes
    assert 0 <= row["changed"] <= row["decisions"]
    assert not hasattr(model, "_longflow_policy")  # unapplied afterwards


def test_fp16_logits_tie_slots_that_fp32_tells_apart():
    # Slots 0 and 1 differ by less than fp16's resolution near 14 (base 2): fp32 evicts slot 1,
    # the lower; rounded, they tie and the earlier slot goes. Slots 2 and 3 score far higher.
    k_cache = torch.tensor([[10.001, 0.0], [10.0, 0.0], [16.0, 0.0], [17.0, 0.0]]).view(1, 1, 4, 2)
    step = {"k_cache": k_cache, "slot_pos": torch.tensor([[[10, 11, 12, 13]]]), "shared": True,
            "slot_limit": torch.tensor([[4]]), "scale": 1.0, "value_norm": torch.ones(1, 1, 4),
            "position": torch.tensor([100]), "sink_tokens": 0, "recent_window": 0,
            "score_kind": ScoreKind.CONTRIBUTION}  # fmt: skip
    q = torch.tensor([[[1.0, 0.0]]])
    assert choices.contribution_ranks(step, q, torch.float32).argmin(-1).item() == 1
    assert choices.contribution_ranks(step, q, torch.float16).argmin(-1).item() == 0
