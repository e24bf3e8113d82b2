"""With nothing evicted, a patched model generates exactly what plain transformers generates."""

import pytest
import torch

import longflow_patch
from longflow_patch.compat import cache_keyword

from models import ARCHITECTURES, HEAD_LAYOUTS, left_padded_prompts, tiny_model


def greedy(model, ids, mask, new_tokens=24):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


@pytest.mark.parametrize("heads", sorted(HEAD_LAYOUTS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_generation_identical_when_budget_holds_everything(arch, heads, per_head):
    model = tiny_model(arch, heads)
    ids, mask = left_padded_prompts(batch=3, length=12)
    expected = greedy(model, ids, mask)
    longflow_patch.apply(model, budget=12 + 24, per_head=per_head)
    assert torch.equal(greedy(model, ids, mask), expected)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_identical_under_each_prompt_attention_implementation(implementation):
    model = tiny_model("llama", "gqa", attn_implementation=implementation)
    ids, mask = left_padded_prompts(batch=2, length=9)
    expected = greedy(model, ids, mask)
    longflow_patch.apply(model, budget=64)
    assert torch.equal(greedy(model, ids, mask), expected)


def test_logits_match_step_by_step_with_user_passed_cache():
    model = tiny_model("qwen3", "gqa")
    ids, mask = left_padded_prompts(batch=2, length=10)
    expected = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    longflow_patch.apply(model, budget=32)
    cache = longflow_patch.new_cache(model)
    got = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **{cache_keyword(model): cache},
    )
    assert got[cache_keyword(model)] is cache
    for step_expected, step_got in zip(expected.logits, got.logits, strict=True):
        torch.testing.assert_close(step_got, step_expected, rtol=1e-4, atol=1e-4)


def test_unapply_restores_original_behaviour():
    model = tiny_model("qwen2", "gqa")
    ids, mask = left_padded_prompts(batch=2, length=10)
    expected = greedy(model, ids, mask)
    forwards = [type(m).forward for m in model.modules()]
    longflow_patch.apply(model, budget=16)
    assert not torch.equal(greedy(model, ids, mask), expected)  # tiny budget: eviction changes the output
    longflow_patch.unapply(model)
    assert "generate" not in vars(model)
    assert all("forward" not in vars(m) for m in model.modules())
    assert [type(m).forward for m in model.modules()] == forwards
    assert torch.equal(greedy(model, ids, mask), expected)
