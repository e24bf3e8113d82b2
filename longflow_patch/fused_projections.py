"""Projections that read the same input as one matmul: an attention's q, k and v, an MLP's gate and up.

At decode batch sizes a projection's time is its weight read, and each launch pays its own
ramp-up and tail. On an H100 at batch 64 a Qwen3-8B layer's q, k and v projections take 2.0x
their weight reads as three cuBLAS calls and 1.24x as one (0.45 ms less for a 36-layer step), and
its gate and up projections 1.11x as two calls and 1.08x as one (about 0.07 ms less a step)
(`bench/decoder_gemms.py`, ``bench/results/decoder_gemms_h100.json``).

`fuse` moves a module's projection weights (and biases) into one tensor and points each
projection's parameter at its own rows: the same ``nn.Parameter`` objects with the same values
in the same memory, so the model, its ``state_dict`` and ``save_pretrained`` see no change.
`fused_projection` gives that tensor while the parameters still are its rows; once the model is
moved or cast (new storage for each parameter) it gives None and the projections run apart until
`refresh_fused` fuses again (`longflow_patch.patch.prepare_for_decoding`, which ``generate``,
`longflow_patch.new_cache` and `longflow_patch.speculative_generate` call first). The attention
forward (`longflow_patch.attention`) and `mlp_forward` read the fused tensor.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

QKV = ("q_proj", "k_proj", "v_proj")
"""An attention module's projections that read its hidden states."""
GATE_UP = ("gate_proj", "up_proj")
"""An MLP module's projections that read its input (``down_proj`` reads their product)."""
FUSE_ON_DEVICES = {QKV: ("cuda",), GATE_UP: ("cuda",)}
"""Per set of projections, the device types where `refresh_fused` fuses it: where one launch
instead of several was measured to pay. On a CPU the projections run apart, exactly as
transformers runs them."""


class FusedProjection(NamedTuple):
    """The fused projection of one module: ``weight`` ``[sum(splits), in_features]`` (the rows of the
    projections ``names`` in order), ``bias`` ``[sum(splits)]`` or None, and each one's row count
    ``splits``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    splits: tuple[int, ...]
    names: tuple[str, ...]


def _projections(module: nn.Module, names: tuple[str, ...]) -> list[nn.Linear]:
    return [getattr(module, name) for name in names]


def _hooked(linear: nn.Linear) -> bool:
    """Whether calling ``linear`` runs more than its matmul: torch hooks, or a forward replaced on
    the instance (accelerate's device hooks), which the fused matmul would skip."""
    return bool(linear._forward_hooks or linear._forward_pre_hooks) or "forward" in vars(linear)


def fusable(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether ``module``'s projections ``names`` can share one weight: plain ``nn.Linear`` layers (not
    a quantized, adapter-wrapped or `_hooked` one) of one input size, real floating-point weights on
    one device in one dtype, with a bias on all or on none."""
    linears = _projections(module, names)
    if any(type(linear) is not nn.Linear or _hooked(linear) for linear in linears):
        return False
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears]
    if any(w.is_meta or not w.is_floating_point() for w in weights) or len({b is None for b in biases}) > 1:
        return False
    tensors = weights + [b for b in biases if b is not None]
    return len({(t.device, t.dtype) for t in tensors}) == 1 and len({w.shape[1] for w in weights}) == 1


def fuse(module: nn.Module, names: tuple[str, ...]) -> FusedProjection:
    """Fuse ``module``'s projections ``names`` (see the module docstring); ``fusable(module, names)``
    must hold. Allocates the fused weight, then frees the old ones: no more memory afterwards."""
    linears = _projections(module, names)
    splits = tuple(linear.out_features for linear in linears)

    def fused_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
        # A normal tensor even under `torch.inference_mode` (generate may run in it): parameters
        # made of inference tensors could no longer be loaded into in place or trained.
        with torch.inference_mode(False), torch.no_grad():
            fused = torch.cat([t.detach() for t in tensors])
        for tensor, rows in zip(tensors, fused.split(splits), strict=True):
            tensor.data = rows
        return fused

    weight = fused_rows([linear.weight for linear in linears])
    bias = None if linears[0].bias is None else fused_rows([linear.bias for linear in linears])
    if not torch.compiler.is_compiling():
        # A fixed address, like the cache's buffers: CUDA graphs read it in place, never copy it in.
        torch._dynamo.mark_static_address(weight)
        if bias is not None:
            torch._dynamo.mark_static_address(bias)
    module._longflow_fused = FusedProjection(weight, bias, splits, names)
    return module._longflow_fused


def _still_fused(fused: FusedProjection, module: nn.Module) -> bool:
    """Whether the parameters of ``module`` still are the rows of ``fused`` (host pointer checks)."""
    for tensor, parts in ((fused.weight, "weight"), (fused.bias, "bias")):
        if tensor is None:
            continue
        address = tensor.data_ptr()
        for linear, rows in zip(_projections(module, fused.names), fused.splits, strict=True):
            part = getattr(linear, parts)
            if part.data_ptr() != address or part.dtype != tensor.dtype or part.device != tensor.device:
                return False
            address += rows * tensor.stride(0) * tensor.element_size()
    return True


def fused_projection(module: nn.Module) -> FusedProjection | None:
    """The fused projection of ``module`` while its parameters still are the fused rows, else None.

    Under ``torch.compile`` the check (host pointers) is not traced: the fused projection is used
    as made: `refresh_fused` runs before decoding starts (`longflow_patch.patch.prepare_for_decoding`)."""
    fused = getattr(module, "_longflow_fused", None)
    if fused is None or torch.compiler.is_compiling():
        return fused
    return fused if _still_fused(fused, module) else None


def refresh_fused(modules: list[nn.Module], names: tuple[str, ...]) -> None:
    """Fuse the projections ``names`` of each module that is not fused now (first use, or moved or
    cast since), is on a device of ``FUSE_ON_DEVICES[names]`` and is `fusable`; a stale fusion that
    is not redone is dropped (it would hold the old weights' memory)."""
    for module in modules:
        if fused_projection(module) is not None:
            continue
        unfuse(module)
        device = getattr(module, names[0]).weight.device
        if device.type in FUSE_ON_DEVICES[names] and fusable(module, names):
            fuse(module, names)


def unfuse(module: nn.Module) -> None:
    """Forget ``module``'s fused projection; its parameters stay the rows they are (same values)."""
    module.__dict__.pop("_longflow_fused", None)


def mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for ``LlamaMLP`` / ``Qwen2MLP`` / ``Qwen3MLP``: transformers'
    ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, with gate and up as one matmul while they are
    fused (`fused_projection`), else the module's own forward. ``x`` ``[..., hidden]``."""
    fused = fused_projection(self)
    if fused is None:
        return self._longflow_original_forward(x)
    gate, up = F.linear(x, fused.weight, fused.bias).split(fused.splits, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)
