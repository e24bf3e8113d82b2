"""Speculative verification attention as a custom torch op: ``torch.ops.longflow.verify_attention``.

Registered like ``longflow::decode_attention`` (`longflow_patch.ops`): a pure function (no
mutation) with a fake implementation, so ``torch.compile(fullgraph=True)`` traces it as one node.
The CPU implementation is the PyTorch reference; CUDA tensors run the Triton kernels
(``kernels/verify_attention.py``) except for dtypes, head sizes or query tiles the kernel lacks,
which fall back to the reference. Shapes and semantics: ``kernels/verify_attention_reference.py``.
"""

import torch

from longflow_patch.kernels.verify_attention_reference import verify_attention_reference
from longflow_patch.ops import KERNEL_DTYPES, KERNEL_HEAD_DIMS


@torch.library.custom_op("longflow::verify_attention", mutates_args=())
def verify_attention(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    prefix_len: torch.Tensor,
    k_draft: torch.Tensor,
    v_draft: torch.Tensor,
    draft_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``T`` draft queries ``[B, Hq, T, D]`` over the prefix and the draft tokens, merged by log-sum-exp."""
    return verify_attention_reference(q, k_prefix, v_prefix, prefix_len, k_draft, v_draft, draft_mask, scale)


@verify_attention.register_kernel("cuda")
def _verify_attention_cuda(q: torch.Tensor, *args: object) -> torch.Tensor:
    from longflow_patch.kernels.verify_attention import MAX_QUERY_ROWS, verify_attention_triton

    rows = q.shape[1] // args[0].shape[1] * q.shape[2]
    if q.dtype not in KERNEL_DTYPES or q.shape[-1] not in KERNEL_HEAD_DIMS or rows > MAX_QUERY_ROWS:
        return verify_attention_reference(q, *args)
    return verify_attention_triton(q, *args)


@verify_attention.register_fake
def _verify_attention_fake(q: torch.Tensor, *args: object) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, as every implementation returns (not q's strides)
