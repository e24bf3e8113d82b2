"""The decode step as a custom torch op: ``torch.ops.longflow.decode_attention``.

Registered through ``torch.library`` with its in-place mutations declared and a fake (meta)
implementation, so ``torch.compile(fullgraph=True)`` traces it as one node and CUDA graphs can
capture it. The CPU implementation is the PyTorch reference; CUDA tensors run the fused Triton
kernel (``kernels/decode_attention.py``), except for dtypes or head sizes the kernel lacks, which
fall back to the reference (documented; `apply` warns). Shapes and semantics:
``kernels/decode_attention_reference.py``.

`decode_step` is what the cache calls: the op while tracing or capturing a CUDA graph, and
otherwise, on CUDA, the Triton launcher itself with scratch buffers kept between calls, so an
eager step pays neither the ``torch.library`` dispatch nor allocations (same result bit for bit).
"""

from typing import NamedTuple

import torch

from longflow_patch.kernels import side_stream
from longflow_patch.kernels.decode_attention_reference import decode_attention_reference

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)


@torch.library.custom_op(
    "longflow::decode_attention",
    mutates_args=("k_cache", "v_cache", "value_norm", "slot_pos", "write_slot", "slot_limit", "accumulated"),
)
def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    value_norm: torch.Tensor,
    slot_pos: torch.Tensor,
    write_slot: torch.Tensor,
    position: torch.Tensor,
    slot_limit: torch.Tensor,
    accumulated: torch.Tensor | None,
    scale: float,
    sink_tokens: int,
    recent_window: int,
    shared: bool,
    score_kind: int,
    planned_slots: int = 0,
    reallocate_every: int = 0,
    min_limit: int = 0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
    overlap_scoring: bool = False,
) -> torch.Tensor:
    """One fused decode step: write the new token, attend, score slots, choose the next slot.
    ``planned_slots``: the mean live slots per head when budgets are ragged (a launch hint for
    the kernel's work split; 0 plans for every slot). ``reallocate_every`` (0: never) and
    ``min_limit``: every that many positions, move one slot between two KV heads (ReasonAlloc's
    online step), keeping each head at ``min_limit`` slots or more. ``cos`` / ``sin`` ``[B, D]``
    (and ``q_norm_weight`` / ``k_norm_weight`` ``[D]``, ``norm_eps``): ``q`` and ``k_new`` come
    before RoPE (and Qwen3's q/k norms), which the step applies (`NewTokenPreparation`).
    ``overlap_scoring``: on the GPU, the step may finish choosing the next slot on a side stream,
    beside the caller's next kernels; the caller's next call of the op joins it, so the caller must
    make one before anything else reads the cache (`kernels/side_stream.py`). No effect on the result."""
    return decode_attention_reference(
        q, k_new, v_new, k_cache, v_cache, value_norm, slot_pos, write_slot, position, slot_limit, accumulated,
        scale, sink_tokens, recent_window, shared, score_kind, planned_slots, reallocate_every, min_limit,
        cos, sin, q_norm_weight, k_norm_weight, norm_eps, overlap_scoring,
    )  # fmt: skip


class NewTokenPreparation(NamedTuple):
    """What turns decode tokens' projected queries and keys into the attention's: transformers'
    RoPE tables ``cos`` / ``sin`` ``[B or 1, n, D]`` at the tokens' positions and, for Qwen3, the
    q/k RMSNorm weights ``[D]`` (None for Llama and Qwen2) and epsilon. Given these, the op applies
    them to each new token (its attention pass does, on the GPU) instead of kernels of their own."""

    cos: torch.Tensor
    sin: torch.Tensor
    q_norm_weight: torch.Tensor | None
    k_norm_weight: torch.Tensor | None
    eps: float

    def tokens(self, index: slice) -> "NewTokenPreparation":
        """The preparation of tokens ``index`` of the ``n``."""
        return NewTokenPreparation(
            self.cos[:, index], self.sin[:, index], self.q_norm_weight, self.k_norm_weight, self.eps
        )

    def op_arguments(self, token: int, batch: int) -> tuple:
        """The op's ``cos, sin, q_norm_weight, k_norm_weight, norm_eps`` for token ``token``, tables ``[B, D]``."""
        cos, sin = (table[:, token].expand(batch, -1) for table in (self.cos, self.sin))
        return cos, sin, self.q_norm_weight, self.k_norm_weight, self.eps


def runs_fused_kernel(q: torch.Tensor) -> bool:
    """Whether the op runs the Triton kernel for queries like ``q`` (CUDA, fp16/bf16, a head size it has)."""
    return q.is_cuda and q.dtype in KERNEL_DTYPES and q.shape[-1] in KERNEL_HEAD_DIMS


@decode_attention.register_kernel("cuda")
def _decode_attention_cuda(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    if not runs_fused_kernel(q):
        side_stream.join()  # a kernel call of this thread may have left its scoring pass beside
        return decode_attention_reference(q, *args, **kwargs)
    from longflow_patch.kernels.decode_attention import decode_attention_triton

    return decode_attention_triton(q, *args, **kwargs)


def decode_step(q: torch.Tensor, *args: object, overlap_scoring: bool = False, workspaces: dict) -> torch.Tensor:
    """One decode step, with the arguments of ``decode_attention``; ``workspaces``: a dict owned by
    the caller (the cache) where eager steps keep their scratch buffers.

    Eager, on CUDA and outside CUDA-graph capture, it calls the Triton launcher directly (no
    ``torch.library`` dispatch, no scratch allocation, no Triton JIT after the first step unless
    ``LONGFLOW_DIRECT_LAUNCH=0``: `kernels/launch.py`); while ``torch.compile`` traces it, and
    on the CPU, it is the registered op.
    """
    # Dynamo folds is_compiling() to True and stops there: the capture query, which it cannot
    # trace (a graph break under fullgraph), is only ever asked eagerly, and only of CUDA tensors.
    if (
        torch.compiler.is_compiling()
        or not runs_fused_kernel(q)
        or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    ):
        return decode_attention(q, *args, overlap_scoring=overlap_scoring)
    from longflow_patch.kernels.decode_attention import decode_attention_triton

    return decode_attention_triton(q, *args, overlap_scoring=overlap_scoring, workspaces=workspaces)


@decode_attention.register_fake
def _decode_attention_fake(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, as every implementation returns (not q's strides)
