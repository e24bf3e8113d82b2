"""Compressed decoding: constant cache size, small budgets, long prompts, clear errors."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import longflow_patch
from longflow_patch.cache import LongFlowCache
from longflow_patch.compat import cache_keyword

from models import left_padded_prompts, tiny_model


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
@pytest.mark.parametrize("prompt", [8, 40], ids=["short-prompt", "prompt-over-budget"])
def test_small_budget_long_generation_stays_fixed_size(per_head, prompt):
    model = tiny_model("qwen3", "gqa")
    longflow_patch.apply(model, budget=16, per_head=per_head)
    ids, mask = left_padded_prompts(batch=2, length=prompt)
    cache = longflow_patch.new_cache(model)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=150,
        min_new_tokens=150,
        do_sample=False,
        pad_token_id=0,
        **{cache_keyword(model): cache},
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (2, prompt + 150)
    assert all(torch.isfinite(step).all() for step in out.logits)
    for layer in cache.layers:
        assert layer.keys.shape == (2, 2, 16, 16) and layer.values.shape == (2, 2, 16, 16)
        assert (layer.slot_pos >= 0).all(), "a full cache has no empty slot"
        assert len(set(layer.slot_pos[0, 0].tolist())) == 16, "a token is held twice"
        newest = prompt + 150 - 1 - 1  # position of the last token written (row 0 has no padding)
        assert layer.slot_pos[0].max().item() == newest
        sinks = torch.arange(4, dtype=torch.int32)
        assert torch.isin(sinks, layer.slot_pos[0, 0]).all(), "sink tokens were evicted"
    assert cache.get_seq_length() == prompt + 149


def test_memory_flat_in_output_length():
    model = tiny_model("llama", "gqa")
    longflow_patch.apply(model, budget=32)
    ids, mask = left_padded_prompts(batch=1, length=8)
    sizes = []
    for new_tokens in (10, 100):
        cache = longflow_patch.new_cache(model)
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **{cache_keyword(model): cache},
        )
        sizes.append(cache.kv_bytes())
    assert sizes[0] == sizes[1] == 2 * 2 * (1 * 2 * 32 * 16) * 4  # layers x (K, V) x elements x fp32


def test_long_prompt_keeps_sinks_recent_and_most_attended():
    model = tiny_model("qwen3", "mqa", layers=1)
    longflow_patch.apply(model, budget=20, sink_tokens=2, recent_window=6)
    ids = torch.randint(3, 128, (1, 60))
    cache = longflow_patch.new_cache(model)
    model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True)
    kept = sorted(cache.layers[0].slot_pos[0, 0].tolist())
    assert len(kept) == 20 and kept[:2] == [0, 1] and kept[-6:] == list(range(54, 60))


def test_full_policy_cache_reports_sequence_length_not_slots():
    model = tiny_model("qwen3", "gqa")
    longflow_patch.apply(model, budget=16)
    cache = longflow_patch.new_cache(model)
    model(input_ids=torch.randint(3, 128, (1, 30)), **{cache_keyword(model): cache}, use_cache=True)
    assert cache.get_seq_length() == 30
    assert isinstance(cache, LongFlowCache)


def test_unsupported_model_names_type_and_supported_list():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32)
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel.*LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        longflow_patch.apply(GPT2LMHeadModel(config), budget=64)


def test_budget_below_minimum_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"budget=10 is too small.*at least sink_tokens \+ recent_window \+ 1 = 13"):
        longflow_patch.apply(model, budget=10)
    longflow_patch.apply(model, budget=3, sink_tokens=0, recent_window=2)  # the documented minimum holds


def test_unknown_policy_and_sliding_window_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        longflow_patch.apply(model, policy="nope")
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="sliding-window"):
        longflow_patch.apply(model)


def test_unsupported_attention_implementation_is_refused():
    model = tiny_model(attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="flex_attention"):
        longflow_patch.apply(model)
