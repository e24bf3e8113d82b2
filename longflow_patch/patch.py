"""`apply` / `unapply`: patch a Hugging Face causal LM in place, without forking transformers.

`apply` replaces the ``forward`` of every attention and MLP module (an instance attribute, so the
class and other models are untouched) and wraps the model's ``generate`` so each call gets a fresh
`LongFlowCache` unless the caller passes a cache. `unapply` removes both.
"""

import dataclasses
import types
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn
from transformers import CompileConfig

from longflow_patch.attention import longflow_attention_forward, refresh_norms_in_op
from longflow_patch.cache import LongFlowCache
from longflow_patch.compat import cache_from_kwargs, cache_keyword, defer_stop_check_on_cuda
from longflow_patch.fused_projections import GATE_UP, QKV, mlp_forward, refresh_fused, unfuse
from longflow_patch.ops import KERNEL_DTYPES, KERNEL_HEAD_DIMS
from longflow_patch.policies import Policy, ProfiledPolicy, check_budget, make_policy

SUPPORTED_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
"""The model classes `apply` patches (full-attention layers only); any other is refused."""
SUPPORTED_ATTENTION = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention")
SUPPORTED_MLP = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP")
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_ATTENTION]


def _mlp_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_MLP]


def _patched_modules(model: nn.Module) -> list[tuple[nn.Module, Callable[..., object]]]:
    """Each module whose ``forward`` `apply` replaces, with its replacement."""
    return [(m, longflow_attention_forward) for m in _attention_modules(model)] + [
        (m, mlp_forward) for m in _mlp_modules(model)
    ]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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
    head_dim = _head_dim(config)
    if parameter.is_cuda and (parameter.dtype not in KERNEL_DTYPES or head_dim not in KERNEL_HEAD_DIMS):
        warnings.warn(
            f"the fused Triton kernel needs float16/bfloat16 and head_dim in {KERNEL_HEAD_DIMS} (model: "
            f"{parameter.dtype}, head_dim={head_dim}); decoding falls back to the PyTorch reference, "
            "which is correct but slower",
            stacklevel=3,
        )


def _check_compile_request(model: nn.Module, policy: Policy, compile: bool | str) -> bool | str:
    """``compile`` as True, False or "auto"; raises for any other value, and for ``compile=True``
    where the decode step cannot compile (a host-side policy, or a model spread over devices)."""
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if compile == "auto" or not compile:
        return "auto" if compile == "auto" else False
    if not policy.compileable:
        scorer = (
            f" over scorer {policy.scorer!r} (scorer='longflow' compiles)" if isinstance(policy, ProfiledPolicy) else ""
        )
        raise ValueError(
            f"policy {policy.name!r}{scorer} re-selects its cache on the host and runs eagerly; compile=False"
        )
    if len(_placement(model)) > 1:
        raise ValueError("compile=True needs the whole model on one device; a model spread by device_map runs eagerly")
    return True


def _placement(model: nn.Module) -> set[str]:
    """Where the model's weights are: its parameters' devices, and every device of a ``device_map``
    that spreads it over several."""
    devices = {str(parameter.device) for parameter in model.parameters()}
    mapped = {str(device) for device in getattr(model, "hf_device_map", {}).values()}
    return devices | mapped if len(mapped) > 1 else devices


def compile_blocker(model: nn.Module, policy: Policy) -> str | None:
    """Why ``compile="auto"`` decodes ``model`` under ``policy`` eagerly, or None when it compiles."""
    placement = _placement(model)
    if len(placement) > 1:
        return f"the model is spread over {sorted(placement)}"
    if not next(iter(placement)).startswith("cuda"):
        return f"the model is on {next(iter(placement))}, not a CUDA device"
    if not policy.compileable:
        return f"policy {policy.name!r} re-selects its cache on the host"
    if policy.sized_by_generate:
        return f"policy {policy.name!r} sizes its cache per call, so every new length would compile again"
    parameter, head_dim = next(model.parameters()), _head_dim(model.config)
    if parameter.dtype not in KERNEL_DTYPES or head_dim not in KERNEL_HEAD_DIMS:
        return f"the fused kernel does not serve {parameter.dtype} with head_dim={head_dim}"
    return None


def _resolve_compile(model: nn.Module, policy: Policy, compile: bool | str) -> bool:
    """Whether this ``generate`` call compiles the decode step (``compile`` as given to `apply`)."""
    return compile is True or (compile == "auto" and compile_blocker(model, policy) is None)


def apply(
    model: nn.Module,
    policy: str | Policy = "longflow",
    budget: int = 2048,
    compile: bool | str = "auto",
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
    policy does not take raises ValueError listing those it does. Applying again replaces the
    previous settings; `unapply` undoes the patch.

    ``compile``: when ``generate`` compiles the decode step (``fullgraph=True``) and replays it
    under CUDA graphs (``mode="reduce-overhead"``) for any output length, through transformers'
    own compile path. ``"auto"`` (the default) decides at each ``generate`` call, from where the
    model sits then (so moving it after `apply` needs nothing more): it compiles when the whole
    model is on one CUDA device, in float16 / bfloat16 with a head size the fused kernel has, under
    a policy that decodes with static shapes and is not sized per call (`compile_blocker`), and
    decodes eagerly otherwise (CPU, ``device_map`` across devices, compacting policies, ``full``).
    ``True`` compiles and raises here where it cannot; ``False`` never compiles. A compiled
    decode step is compiled once per shape (a batch size and budget), with static shapes, for the
    first `STATIC_SHAPES` shapes; later shapes share one graph compiled with dynamic shapes (a
    step compiled with dynamic shapes idles longer on the host: 36.0 against 30.6 ms at 16k on
    an H100; and torch refuses a ninth compile of one function). A new shape compiles (or, past
    those, captures) again, and ``generate`` warns when it meets one. A ``compile_config`` given
    to ``generate`` replaces these settings.

    On a CUDA device, ``generate`` (and `new_cache`, `speculative_generate`) also runs each
    attention's q, k and v projections as one matmul, and each MLP's gate and up projections as
    another (`longflow_patch.fused_projections`): the weights move into one tensor and the parameters
    point at their rows, with the same values and no added memory, and ``state_dict`` /
    ``save_pretrained`` see no change. Plain ``nn.Linear`` projections only (a quantized,
    adapter-wrapped or hooked one runs as before); a model moved or cast since runs them apart until
    the next call fuses again. A fused MLP serves every forward of the patched model, also one
    without a compressed cache: the same sums, which cuBLAS may round differently in bf16.
    """
    _check_model(model)
    check_budget(budget)
    if not isinstance(policy, Policy):
        policy = make_policy(policy, budget=budget, **settings)
    elif settings:
        raise TypeError("pass settings either inside a Policy object or as keyword arguments, not both")
    model._longflow_compile = _check_compile_request(model, policy, compile)
    defer_stop_check_on_cuda()
    for module, forward in _patched_modules(model):
        if not hasattr(module, "_longflow_original_forward"):
            module._longflow_original_forward = module.forward
            module.forward = types.MethodType(forward, module)
    if not hasattr(model, "_longflow_original_generate"):
        model._longflow_original_generate = model.generate
        model.generate = types.MethodType(_generate_with_compressed_cache, model)
    model._longflow_policy = policy
    return model


def unapply(model: nn.Module) -> nn.Module:
    """Undo `apply`: the model behaves exactly as before it was patched; returns it."""
    for module, _ in _patched_modules(model):
        unfuse(module)
        module.__dict__.pop("_longflow_norms_in_op", None)
        if hasattr(module, "_longflow_original_forward"):
            del module.forward
            del module._longflow_original_forward
    if hasattr(model, "_longflow_original_generate"):
        del model.generate
        del model._longflow_original_generate
    for name in ("_longflow_policy", "_longflow_compile", "_longflow_reused_cache"):
        model.__dict__.pop(name, None)
    return model


def prepare_for_decoding(model: nn.Module) -> None:
    """What `generate`, `new_cache` and `speculative_generate` do before decoding, so that a compiled
    step never reads a stale decision: run each attention's q/k/v projections of ``model`` as one
    matmul, and each MLP's gate and up projections as another, where that pays and is safe
    (`longflow_patch.fused_projections.refresh_fused`), and mark the Qwen3 q/k norms the fused op
    may apply itself (`longflow_patch.attention.refresh_norms_in_op`)."""
    modules = _attention_modules(model)
    refresh_fused(modules, QKV)
    refresh_fused(_mlp_modules(model), GATE_UP)
    refresh_norms_in_op(modules)


def new_cache(model: nn.Module, budget: int | None = None) -> LongFlowCache:
    """A fresh, empty compressed cache for a patched model (what `generate` builds per call), to
    pass to ``generate`` or ``forward`` yourself, e.g. to read ``cache.kv_bytes()`` afterwards.

    ``budget`` overrides the policy's budget (the full-cache policy sizes it per call).
    """
    if not hasattr(model, "_longflow_policy"):
        raise ValueError("the model is not patched: call longflow_patch.apply(model, ...) first")
    prepare_for_decoding(model)
    return _empty_cache(model, budget)


def _empty_cache(model: nn.Module, budget: int | None) -> LongFlowCache:
    """`new_cache` less its checks and fusion, for `generate`, which has done both."""
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

    When this call compiles (`apply`'s ``compile``, resolved now), transformers is given the
    decode step's compile settings (unless the caller set a ``compile_config`` of their own), and
    one cache is kept and refilled by every call (like transformers' static cache), so its
    buffers keep their addresses and the captured CUDA graph is replayed, not re-recorded; a
    cache returned by one call is then overwritten by the next. Otherwise decoding is eager:
    transformers would compile any generate call on a GPU whose cache is compileable (a surprise
    compile per new shape, and endless recompiles under device_map's hooks), so it is told not to
    unless the caller asks for it (a ``compile_config`` of their own, or ``disable_compile``).
    On CUDA, ``generate`` reads its stop check one step late for a cache made here and not
    returned (`longflow_patch.compat.defer_stop_check_on_cuda`), so the host never waits on a step.
    """
    compiling = _resolve_compile(self, self._longflow_policy, self._longflow_compile)
    prepare_for_decoding(self)  # the model may have moved since the last call
    _, given = cache_from_kwargs(kwargs, "generate")
    if given is not None and not isinstance(given, LongFlowCache):
        raise TypeError(
            f"generate of a model patched by longflow_patch got a {type(given).__name__}, which the patched "
            "attention would fill without compression; pass no cache (each call gets a compressed one), one "
            "from longflow_patch.new_cache(model), or call longflow_patch.unapply(model) first"
        )
    if given is not None:
        given.made_by_generate = False  # the caller's, even one an earlier call returned
    elif kwargs.get("use_cache", True):
        policy = self._longflow_policy
        budget = max(policy.minimum_budget, _tokens_to_hold(self, args, kwargs)) if policy.sized_by_generate else None
        cache = getattr(self, "_longflow_reused_cache", None)
        if cache is None or cache.policy is not policy or budget is not None:
            cache = _empty_cache(self, budget)
        if compiling:
            self._longflow_reused_cache = cache
        cache.reset()
        cache.made_by_generate = True
        kwargs[cache_keyword(self)] = cache
    config = kwargs.get("generation_config") or self.generation_config
    if config.compile_config is None and "compile_config" not in kwargs:
        if compiling:  # a fresh object per call: transformers may edit it (fullgraph under flash-attn)
            kwargs["compile_config"] = decode_compile_config(self)
        else:
            kwargs.setdefault("disable_compile", True)
    output = self._longflow_original_generate(*args, **kwargs)
    if compiling:
        _warn_on_new_shape(self, kwargs.get(cache_keyword(self), given))
    return output


STATIC_SHAPES = 4
"""Cache shapes (batch size, budget) compiled with static shapes per patched model; later ones
share one dynamic-shape graph. torch compiles one function at most
``torch._dynamo.config.recompile_limit`` times (8 by default), and fails under ``fullgraph``
past that: four static graphs leave room for the dynamic one (and one more if a later budget
change makes the cache's length dynamic too)."""


_COMPILED_SHAPES: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
"""The cache shapes each model's compiled ``generate`` met; kept across `unapply` and `apply`, as
the compiled graphs are (they count toward the recompile limit)."""


def decode_compile_config(model: nn.Module) -> CompileConfig:
    """The compile settings a compiled ``generate`` of ``model`` hands transformers: the whole step
    (``fullgraph``) under CUDA graphs (``mode="reduce-overhead"``), with static shapes until
    `STATIC_SHAPES` shapes were met, then with dynamic shapes (``dynamic=None``: the sizes seen to
    change become symbolic), for good: transformers compiles afresh whenever the settings change."""
    return CompileConfig(fullgraph=True, mode="reduce-overhead", dynamic=False if _static_shapes_left(model) else None)


def _static_shapes_left(model: nn.Module) -> bool:
    """Whether ``model``'s compiled ``generate`` still compiles a new shape with static shapes
    (fewer than `STATIC_SHAPES` shapes met so far)."""
    return len(_COMPILED_SHAPES.get(model, [])) < STATIC_SHAPES


def _warn_on_new_shape(model: nn.Module, cache: LongFlowCache | None) -> None:
    """Warn the first time compiled decoding meets a cache shape after another: that call
    compiled the decode step again (or captured new CUDA graphs), a one-time cost per shape."""
    if cache is None or not cache.layers[0].is_initialized:
        return
    batch, slots = cache.layers[0].keys.shape[0], cache.layers[0].keys.shape[2]
    shape = (batch, tuple(layer.keys.shape[2] for layer in cache.layers), cache.layers[0].keys.dtype)
    seen = _COMPILED_SHAPES.setdefault(model, [])
    if shape in seen:
        return
    if seen:
        how = "again (static shapes)" if _static_shapes_left(model) else "with dynamic shapes (or reused that graph)"
        warnings.warn(
            f"compiled decoding met a new shape (batch {batch}, {slots} slots per KV head in layer 0; "
            f"{len(seen)} shape(s) before): this generate call compiled the decode step {how} and captured "
            "new CUDA graphs, a one-time cost per shape; keep the batch size and budget fixed to avoid it, or "
            "apply(..., compile=False)",
            stacklevel=3,
        )
    seen.append(shape)
