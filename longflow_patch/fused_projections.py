"""The query, key and value projections of a decode step as one matmul.

At decode batch sizes a projection's time is its weight read, and each launch pays its own
ramp-up and tail. On an H100 at batch 64 a Qwen3-8B layer's q, k and v projections take 2.0x
their weight reads as three cuBLAS calls and 1.24x as one: 0.45 ms less for a 36-layer step
(`bench/decoder_gemms.py`, ``bench/results/decoder_gemms_h100.json``).

`fuse_qkv` moves a module's three weights (and biases) into one tensor and points each
projection's parameter at its own rows: the same ``nn.Parameter`` objects with the same values
in the same memory, so the model, its ``state_dict`` and ``save_pretrained`` see no change.
`fused_qkv` gives that tensor while the parameters still are its rows; once the model is moved
or cast (new storage for each parameter) it gives None and the projections run apart until
`refresh_fused_qkv` fuses again (`longflow_patch.patch.prepare_for_decoding`, which ``generate``,
`longflow_patch.new_cache` and `longflow_patch.speculative_generate` call first).
"""

from typing import NamedTuple

import torch
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj")
FUSE_ON_DEVICES = ("cuda",)
"""Device types where `refresh_fused_qkv` fuses: where one launch instead of three was measured to
pay. On a CPU the projections run apart, exactly as transformers runs them."""


class FusedQKV(NamedTuple):
    """The fused projection of one attention module: ``weight`` ``[Nq + 2 Nkv, hidden]`` (the
    rows of q_proj, k_proj, v_proj in order), ``bias`` ``[Nq + 2 Nkv]`` or None, and the three
    row counts ``splits``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    splits: tuple[int, int, int]


def _projections(module: nn.Module) -> list[nn.Linear]:
    return [getattr(module, name) for name in PROJECTIONS]


def _hooked(linear: nn.Linear) -> bool:
    """Whether calling ``linear`` runs more than its matmul: torch hooks, or a forward replaced on
    the instance (accelerate's device hooks), which the fused matmul would skip."""
    return bool(linear._forward_hooks or linear._forward_pre_hooks) or "forward" in vars(linear)


def fusable(module: nn.Module) -> bool:
    """Whether ``module``'s q/k/v projections can share one weight: plain ``nn.Linear`` layers (not
    a quantized, adapter-wrapped or `_hooked` one), real floating-point weights on one device in one
    dtype, with a bias on all three or on none."""
    linears = _projections(module)
    if any(type(linear) is not nn.Linear or _hooked(linear) for linear in linears):
        return False
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears]
    if any(w.is_meta or not w.is_floating_point() for w in weights) or len({b is None for b in biases}) > 1:
        return False
    tensors = weights + [b for b in biases if b is not None]
    return len({(t.device, t.dtype) for t in tensors}) == 1


def fuse_qkv(module: nn.Module) -> FusedQKV:
    """Fuse ``module``'s q/k/v projections (see the module docstring); ``fusable(module)`` must hold.
    Allocates the fused weight, then frees the three old ones: no more memory afterwards."""
    linears = _projections(module)
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
    module._longflow_fused_qkv = FusedQKV(weight, bias, splits)
    return module._longflow_fused_qkv


def _still_fused(fused: FusedQKV, module: nn.Module) -> bool:
    """Whether the parameters of ``module`` still are the rows of ``fused`` (host pointer checks)."""
    for tensor, parts in ((fused.weight, "weight"), (fused.bias, "bias")):
        if tensor is None:
            continue
        address = tensor.data_ptr()
        for linear, rows in zip(_projections(module), fused.splits, strict=True):
            part = getattr(linear, parts)
            if part.data_ptr() != address or part.dtype != tensor.dtype or part.device != tensor.device:
                return False
            address += rows * tensor.stride(0) * tensor.element_size()
    return True


def fused_qkv(module: nn.Module) -> FusedQKV | None:
    """The fused projection of ``module`` while its parameters still are the fused rows, else None.

    Under ``torch.compile`` the check (host pointers) is not traced: the fused projection is used
    as made: `refresh_fused_qkv` runs before decoding starts (`longflow_patch.patch.prepare_for_decoding`)."""
    fused = getattr(module, "_longflow_fused_qkv", None)
    if fused is None or torch.compiler.is_compiling():
        return fused
    return fused if _still_fused(fused, module) else None


def refresh_fused_qkv(modules: list[nn.Module]) -> None:
    """Fuse the q/k/v projections of each module that is not fused now (first use, or moved or
    cast since), is on a device of `FUSE_ON_DEVICES` and is `fusable`; a stale fusion that is not
    redone is dropped (it would hold the old weights' memory)."""
    for module in modules:
        if fused_qkv(module) is not None:
            continue
        unfuse_qkv(module)
        if module.q_proj.weight.device.type in FUSE_ON_DEVICES and fusable(module):
            fuse_qkv(module)


def unfuse_qkv(module: nn.Module) -> None:
    """Forget ``module``'s fused projection; its parameters stay the rows they are (same values)."""
    module.__dict__.pop("_longflow_fused_qkv", None)
