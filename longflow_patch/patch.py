"""`apply` / `unapply`: patch a Hugging Face causal LM in place, without forking transformers.

`apply` replaces the ``forward`` of every attention module (an instance attribute, so the class
and other models are untouched) and wraps the model's ``generate`` so each call gets a fresh
`LongFlowCache` unless the caller passes a cache. `unapply` removes both.
"""

import dataclasses
import types
import warnings

import torch
from torch import nn
from transformers import CompileConfig

from longflow_patch.attention import longflow_attention_forward
from longflow_patch.cache import LongFlowCache
from longflow_patch.compat import cache_from_kwargs, cache_keyword
from longflow_patch.ops import KERNEL_DTYPES, KERNEL_HEAD_DIMS
from longflow_patch.policies import Policy, ProfiledPolicy, check_budget, make_policy

SUPPORTED_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
"""The model classes `apply` patches (full-attention layers only); any other is refused."""
SUPPORTED_ATTENTION = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention")
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_ATTENTION]


def _check_model(model: nn.Module) -> None:
    model_type = type(model).__name__
    if model_type not in SUPPORTED_MODELS:
        supported = ", ".join(SUPPORTED_MODELS)
        raise TypeError(f"longflow_patch does not support {model_type}; supported models: {supported}")
    config = model.config
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        raise ValueError(
            f"{model_type} is configured with sliding-window layers (layer_types={set(config.layer_types)}); "
            "longflow_patch supports full-attention layers only"
        )
    implementation = config._attn_implementation
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported for the prompt pass; "
            f"use one of {SUPPORTED_ATTN_IMPLEMENTATIONS}"
        )
    parameter = next(model.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if parameter.is_cuda and (parameter.dtype not in KERNEL_DTYPES or head_dim not in KERNEL_HEAD_DIMS):
        warnings.warn(
            f"the fused Triton kernel needs float16/bfloat16 and head_dim in {KERNEL_HEAD_DIMS} (model: "
            f"{parameter.dtype}, head_dim={head_dim}); decoding falls back to the PyTorch reference, "
            "which is correct but slower",
            stacklevel=3,
        )


def apply(
    model: nn.Module,
    policy: str | Policy = "longflow",
    budget: int = 2048,
    compile: bool = False,
    **settings: object,
) -> nn.Module:
    """Patch ``model`` in place so decoding keeps at most ``budget`` KV slots per layer; returns it.

        longflow_patch.apply(model, policy="longflow", budget=2048)
        out = model.generate(**inputs, max_new_tokens=32768)  # each call gets a fresh compressed cache

    ``model`` is a ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` (`SUPPORTED_MODELS`).
    ``policy`` is a registered name (a key of `longflow_patch.POLICIES`: ``longflow``, ``h2o``,
    ``streamingllm``, ``full``, ``snapkv``, ``rkv``, ``random``, ``lukv``, ``reasonalloc``) or a
    ready `Policy`. ``budget`` is an integer count of KV slots per sequence per layer (per KV head
    for the allocating policies, on average), at least ``sink_tokens + recent_window + 1`` (plus
    ``buffer`` for compacting policies); a float, text or None raises TypeError at once.
    ``settings`` are the policy's options (``sink_tokens``, ``recent_window``, ``per_head``,
    ``observation_window``, ``pooling_kernel``; ``buffer`` for compacting policies; ``profile``
    for ``lukv``/``reasonalloc``; the full list: `longflow_patch.policy_settings`); a setting the
    policy does not take raises ValueError listing those it does. With ``compile=True``,
    ``generate`` on a GPU compiles the decode step once (``fullgraph=True``) and replays it under
    CUDA graphs (``mode="reduce-overhead"``) for any output length, through transformers' own
    compile path. Applying again replaces the previous settings; `unapply` undoes the patch.
    """
    _check_model(model)
    check_budget(budget)
    if not isinstance(policy, Policy):
        policy = make_policy(policy, budget=budget, **settings)
    elif settings:
        raise TypeError("pass settings either inside a Policy object or as keyword arguments, not both")
    if compile and not policy.compileable:
        scorer = (
            f" over scorer {policy.scorer!r} (scorer='longflow' compiles)" if isinstance(policy, ProfiledPolicy) else ""
        )
        raise ValueError(
            f"policy {policy.name!r}{scorer} re-selects its cache on the host and runs eagerly; compile=False"
        )
    if compile and len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        raise ValueError("compile=True needs the whole model on one device; a model spread by device_map runs eagerly")
    if compile:
        if not hasattr(model, "_longflow_original_compile_config"):
            model._longflow_original_compile_config = model.generation_config.compile_config
        model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    for module in _attention_modules(model):
        if not hasattr(module, "_longflow_original_forward"):
            module._longflow_original_forward = module.forward
            module.forward = types.MethodType(longflow_attention_forward, module)
    if not hasattr(model, "_longflow_original_generate"):
        model._longflow_original_generate = model.generate
        model.generate = types.MethodType(_generate_with_compressed_cache, model)
    model._longflow_policy = policy
    return model


def unapply(model: nn.Module) -> nn.Module:
    """Undo `apply`: the model behaves exactly as before it was patched; returns it."""
    for module in _attention_modules(model):
        if hasattr(module, "_longflow_original_forward"):
            del module.forward
            del module._longflow_original_forward
    if hasattr(model, "_longflow_original_generate"):
        del model.generate
        del model._longflow_original_generate
    if hasattr(model, "_longflow_original_compile_config"):
        model.generation_config.compile_config = model._longflow_original_compile_config
        del model._longflow_original_compile_config
    model.__dict__.pop("_longflow_policy", None)
    model.__dict__.pop("_longflow_reused_cache", None)
    return model


def new_cache(model: nn.Module, budget: int | None = None) -> LongFlowCache:
    """A fresh, empty compressed cache for a patched model (what `generate` builds per call), to
    pass to ``generate`` or ``forward`` yourself, e.g. to read ``cache.kv_bytes()`` afterwards.

    ``budget`` overrides the policy's budget (the full-cache policy sizes it per call).
    """
    if not hasattr(model, "_longflow_policy"):
        raise ValueError("the model is not patched: call longflow_patch.apply(model, ...) first")
    policy = model._longflow_policy
    if budget is not None:
        policy = dataclasses.replace(policy, budget=budget)
    return LongFlowCache(policy, model.config.num_hidden_layers)


def _tokens_to_hold(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """Prompt length plus new tokens of a ``generate`` call: what a full cache must hold."""
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs["inputs_embeds"]
    config = kwargs.get("generation_config") or model.generation_config
    new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
    if new_tokens is None:
        return max(kwargs.get("max_length", config.max_length), inputs.shape[1])
    return inputs.shape[1] + new_tokens


def _generate_with_compressed_cache(self: nn.Module, *args, **kwargs) -> torch.Tensor:
    """``generate`` of a patched model: a compressed cache per call unless one is passed.

    In compile mode one cache is kept and refilled by every call (like transformers' static
    cache), so its buffers keep their addresses and the captured CUDA graph is replayed, not
    re-recorded; a cache returned by one call is then overwritten by the next. Otherwise decoding
    is eager: transformers would compile any generate call on a GPU whose cache is compileable
    (a surprise compile per new shape, and endless recompiles under device_map's hooks), so it is
    told not to unless the caller asks for it (a ``compile_config`` of their own, or ``disable_compile``).
    """
    _, given = cache_from_kwargs(kwargs, "generate")
    if given is not None and not isinstance(given, LongFlowCache):
        raise TypeError(
            f"generate of a model patched by longflow_patch got a {type(given).__name__}, which the patched "
            "attention would fill without compression; pass no cache (each call gets a compressed one), one "
            "from longflow_patch.new_cache(model), or call longflow_patch.unapply(model) first"
        )
    if given is None and kwargs.get("use_cache", True):
        policy = self._longflow_policy
        budget = max(policy.minimum_budget, _tokens_to_hold(self, args, kwargs)) if policy.sized_by_generate else None
        cache = getattr(self, "_longflow_reused_cache", None)
        if cache is None or cache.policy is not policy or budget is not None:
            cache = new_cache(self, budget)
        if hasattr(self, "_longflow_original_compile_config"):
            self._longflow_reused_cache = cache
        cache.reset()
        kwargs[cache_keyword(self)] = cache
    config = kwargs.get("generation_config") or self.generation_config
    if not hasattr(self, "_longflow_original_compile_config") and config.compile_config is None:
        kwargs.setdefault("disable_compile", True)
    return self._longflow_original_generate(*args, **kwargs)
