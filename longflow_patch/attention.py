"""The attention forward that `apply` installs on Llama / Qwen2 / Qwen3 attention modules.

It is the model's own forward (projections, Qwen3's q/k norms, RoPE, output projection) with
the KV-cache step replaced: given a `LongFlowCache`, the prompt goes through the model's own
attention implementation and is then compressed into the cache; each decode step is one call of
``torch.ops.longflow.decode_attention``. Given a `SpeculativeCache` (the target of
`speculative_generate`), the prompt also goes through the model's own attention (and, for a
self-draft, fills the draft's compressed cache from the same pass); each verification forward of
``T`` draft tokens is one call of ``torch.ops.longflow.verify_attention``. Any other cache (or
none) runs the original forward. Where `longflow_patch.fused_projections` fused them, the q, k and v
projections run as one matmul.
"""

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from longflow_patch.cache import LongFlowCache
from longflow_patch.compat import cache_from_kwargs
from longflow_patch.fused_projections import fused_qkv
from longflow_patch.prefill import key_padding_from_mask
from longflow_patch.speculative_cache import SpeculativeCache


def _modeling_function(module: nn.Module, name: str) -> Callable:
    """A function (``apply_rotary_pos_emb``, ``eager_attention_forward``) from the module's modeling file."""
    return getattr(sys.modules[type(module).__module__], name)


def _prompt_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> torch.Tensor:
    """The model's own attention implementation over the prompt; returns ``[B, n, Hq, D]``."""
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, _modeling_function(module, "eager_attention_forward")
    )
    attn_output, _ = attention(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,
        scaling=module.scaling,
        sliding_window=getattr(module, "sliding_window", None),
        **kwargs,
    )
    return attn_output


def longflow_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Drop-in forward for ``LlamaAttention`` / ``Qwen2Attention`` / ``Qwen3Attention``.

    ``hidden_states`` ``[B, n, hidden]`` -> ``([B, n, hidden], None)``. The cache comes as
    ``cache=`` or ``past_key_values=``, whichever the installed transformers passes.
    """
    keyword, past_key_values = cache_from_kwargs(kwargs, f"{type(self).__name__} {self.layer_idx}")
    if not isinstance(past_key_values, (LongFlowCache, SpeculativeCache)):
        return self._longflow_original_forward(hidden_states, position_embeddings, attention_mask, **kwargs)
    del kwargs[keyword]
    batch, length = hidden_states.shape[:2]
    hidden_shape = (batch, length, -1, self.head_dim)
    fused = fused_qkv(self)
    if fused is None:
        query, key, value = (projection(hidden_states) for projection in (self.q_proj, self.k_proj, self.v_proj))
    else:  # one matmul over the three weights' shared rows (`longflow_patch.fused_projections`)
        query, key, value = F.linear(hidden_states, fused.weight, fused.bias).split(fused.splits, dim=-1)
    query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
    if hasattr(self, "q_norm"):  # Qwen3
        query, key = self.q_norm(query), self.k_norm(key)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    cos, sin = position_embeddings
    query, key = _modeling_function(self, "apply_rotary_pos_emb")(query, key, cos, sin)

    layer = past_key_values.layers[self.layer_idx]
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=hidden_states.device) + past_key_values.get_seq_length()
    positions = positions.expand(batch, length)
    if isinstance(past_key_values, SpeculativeCache) and layer.prefilled:
        attn_output = layer.verify(query, key, value, self.scaling, past_key_values.draft_mask)
    elif isinstance(past_key_values, SpeculativeCache):
        attn_output = _prompt_attention(self, query, key, value, attention_mask, **kwargs)
        layer.append(key, value)
        if past_key_values.draft is not None:
            is_token = key_padding_from_mask(attention_mask, batch, length).to(key.device)
            past_key_values.draft.layers[self.layer_idx].prefill(query, key, value, is_token, positions, self.scaling)
    elif layer.prefilled:
        attn_output = layer.decode(query, key, value, positions, self.scaling)
    else:
        attn_output = _prompt_attention(self, query, key, value, attention_mask, **kwargs)
        is_token = key_padding_from_mask(attention_mask, batch, length).to(key.device)
        layer.prefill(query, key, value, is_token, positions, self.scaling)
    attn_output = attn_output.reshape(batch, length, -1).contiguous()
    return self.o_proj(attn_output), None
