"""What differs between transformers releases: the cache's keyword, and the `kernels` name."""

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import longflow_patch
from longflow_patch.compat import CACHE_KEYWORDS, cache_keyword

from models import left_padded_prompts, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def first_attention_inputs(model, length: int = 6):
    """Layer 0's attention module, and hidden states ``[1, length, hidden]`` with their rotary embeddings."""
    torch.manual_seed(1)
    hidden = torch.randn(1, length, model.config.hidden_size)
    positions = torch.arange(length)[None]
    return model.model.layers[0].self_attn, hidden, model.model.rotary_emb(hidden, positions)


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_patched_attention_finds_the_cache_under_each_releases_keyword(keyword):
    """transformers before 5.2x passes ``past_key_values=``, later ones ``cache=``: both reach the op."""
    model = longflow_patch.apply(tiny_model("llama", "gqa"), budget=16)
    attention, hidden, rotary = first_attention_inputs(model)
    cache = longflow_patch.new_cache(model)
    out, _ = attention(hidden, rotary, None, **{keyword: cache})
    assert cache.layers[0].prefilled, f"the cache passed as {keyword}= was not filled"
    reference_cache = longflow_patch.new_cache(model)
    other = CACHE_KEYWORDS[1 - CACHE_KEYWORDS.index(keyword)]
    expected, _ = attention(hidden, rotary, None, **{other: reference_cache})
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_cache_under_an_unknown_keyword_raises_instead_of_running_uncompressed():
    model = longflow_patch.apply(tiny_model("qwen3", "gqa"), budget=16)
    attention, hidden, rotary = first_attention_inputs(model)
    with pytest.raises(TypeError, match=r"'kv_cache'.*renamed"):
        attention(hidden, rotary, None, kv_cache=longflow_patch.new_cache(model))


def test_generate_refuses_a_cache_that_would_not_compress():
    model = longflow_patch.apply(tiny_model("qwen3", "gqa"), budget=16)
    ids, mask = left_padded_prompts(batch=2, length=8)
    with pytest.raises(TypeError, match=r"DynamicCache.*new_cache"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0,
                       **{cache_keyword(model): DynamicCache(config=model.config)})  # fmt: skip


def test_a_longflow_cache_in_an_unpatched_model_names_the_cause():
    model = longflow_patch.apply(tiny_model("qwen3", "gqa"), budget=16)
    cache = longflow_patch.new_cache(model)
    longflow_patch.unapply(model)
    with pytest.raises(RuntimeError, match="not patched"):
        model(input_ids=torch.randint(3, 128, (1, 5)), **{cache_keyword(model): cache})


def test_the_kernels_folder_never_shadows_the_hub_package():
    """Run from the repository root (as here), ``import kernels`` must find the Hub's package, which
    transformers imports, not our top-level ``kernels/`` folder: that folder is a namespace portion."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    spec = importlib.util.find_spec("kernels")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert spec is None or spec.origin is None, f"`kernels` resolves to a regular module at {spec.origin}"
    else:
        assert spec.origin is not None and ROOT not in Path(spec.origin).resolve().parents
    assert importlib.util.find_spec("longflow_patch.kernels.decode_attention") is not None
