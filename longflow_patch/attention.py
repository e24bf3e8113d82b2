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
from longflow_patch.fused_projections import fused_projection
from longflow_patch.ops import NewTokenPreparation
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


PREPARE_IN_OP_ON_DEVICES = ("cuda",)
"""Device types where a decode step's new query and key go to the fused op as projected, and the op
applies Qwen3's q/k norms and RoPE (`new_token_preparation`): on a GPU its attention pass does, which
saves a step two kernels a layer. On a CPU transformers' own modules run, bit for bit as transformers."""


def _plain_rms_norm(norm: nn.Module, modeling_module: str, head_dim: int) -> bool:
    """Whether ``norm`` is transformers' RMSNorm as its modeling file defines it (``weight * x /
    rms(x)`` with a ``[D]`` weight), with nothing hooked or swapped in."""
    weight = getattr(norm, "weight", None)
    return (
        type(norm).__name__.endswith("RMSNorm")
        and type(norm).forward.__module__ == modeling_module
        and isinstance(getattr(norm, "variance_epsilon", None), float)
        and isinstance(weight, torch.Tensor)
        and weight.shape == (head_dim,)
        and not (norm._forward_hooks or norm._forward_pre_hooks or "forward" in vars(norm))
    )


def refresh_norms_in_op(modules: list[nn.Module]) -> None:
    """Mark each Qwen3 attention whose q/k norms the op may apply (`_plain_rms_norm`, one epsilon):
    decided before decoding (`longflow_patch.patch.prepare_for_decoding`), outside any compiled step."""
    for module in modules:
        if hasattr(module, "q_norm"):
            norms = (module.q_norm, module.k_norm)
            module._longflow_norms_in_op = (
                all(_plain_rms_norm(norm, type(module).__module__, module.head_dim) for norm in norms)
                and norms[0].variance_epsilon == norms[1].variance_epsilon
            )


def new_token_preparation(
    module: nn.Module, query: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> NewTokenPreparation | None:
    """What the fused op needs to normalise and rotate a decode step's new query and key itself
    (transformers' RoPE of Llama / Qwen2 / Qwen3, and Qwen3's RMSNorms), on a device of
    `PREPARE_IN_OP_ON_DEVICES`; None elsewhere, or where the norms are not marked plain
    (`refresh_norms_in_op`) or not in the query's dtype: then the model's modules run.

    ``query`` ``[B, n, Hq, D]`` as projected; ``position_embeddings`` ``(cos, sin)`` ``[B or 1, n, D]``.
    """
    cos, sin = position_embeddings
    if query.device.type not in PREPARE_IN_OP_ON_DEVICES or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return None
    if not hasattr(module, "q_norm"):
        return NewTokenPreparation(cos, sin, None, None, 0.0)
    q_norm, k_norm = module.q_norm, module.k_norm
    in_dtype = q_norm.weight.dtype == k_norm.weight.dtype == query.dtype
    if not (getattr(module, "_longflow_norms_in_op", False) and in_dtype):
        return None
    return NewTokenPreparation(cos, sin, q_norm.weight, k_norm.weight, q_norm.variance_epsilon)


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
    fused = fused_projection(self)
    if fused is None:
        query, key, value = (projection(hidden_states) for projection in (self.q_proj, self.k_proj, self.v_proj))
    else:  # one matmul over the three weights' shared rows (`longflow_patch.fused_projections`)
        query, key, value = F.linear(hidden_states, fused.weight, fused.bias).split(fused.splits, dim=-1)
    query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
    layer = past_key_values.layers[self.layer_idx]
    preparation = None
    # Not for compacting policies: they keep the decode queries, rotated, to re-select the cache.
    if isinstance(past_key_values, LongFlowCache) and layer.prefilled and not layer.policy.compacting:
        preparation = new_token_preparation(self, query, position_embeddings)
    if preparation is None:
        if hasattr(self, "q_norm"):  # Qwen3
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = _modeling_function(self, "apply_rotary_pos_emb")(
            query.transpose(1, 2), key.transpose(1, 2), *position_embeddings
        )
    else:
        query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = value.transpose(1, 2)

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
        attn_output = layer.decode(query, key, value, positions, self.scaling, preparation)
    else:
        attn_output = _prompt_attention(self, query, key, value, attention_mask, **kwargs)
        is_token = key_padding_from_mask(attention_mask, batch, length).to(key.device)
        layer.prefill(query, key, value, is_token, positions, self.scaling)
    attn_output = attn_output.reshape(batch, length, -1).contiguous()
    return self.o_proj(attn_output), None
