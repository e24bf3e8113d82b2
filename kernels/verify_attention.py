"""Speculative verification attention in Triton: ``T`` draft queries over a long prefix plus
themselves, in two launches.

The PyTorch reference beside this file (`verify_attention_reference.py`) defines the semantics
and shapes. LongSpec's point is that verification over a long prefix costs about one decode step,
not ``T``: the prefix K/V are read once for all draft queries.

1. ``_prefix_split_kernel`` (grid ``splits x Hkv x B``, flash-decoding split-K). Each program
   owns one KV head of one row and a contiguous range of prefix slots. It loads the ``T x G``
   queries that share that KV head as one ``[BLOCK_M, D]`` tile (row ``m = g * T + t``, padded
   to 16 rows for ``tl.dot``), then streams its slots in ``[BLOCK_S, D]`` tiles of K and V: each
   K/V byte is read once and feeds one ``tl.dot`` for all ``T * G`` query rows. It keeps an online
   softmax (base 2, float32) and writes the unnormalised partial output and its max and sum.
2. ``_combine_kernel`` (grid ``Hkv x B``). Merges the split partials, then attends the ``T``
   draft keys of the same KV head under the draft mask (a ``[BLOCK_M, BLOCK_T]`` tile, padded to
   16 columns) and folds them into the same running max / sum: the prefix and draft parts are
   merged exactly, as in `merge_attention_states`. Writes the normalised output.
"""

import math

import torch
import triton
import triton.language as tl

from .decode_attention import LOG2E, AttendLaunch, multiprocessor_count, plan_splits
from .online_softmax import merge_split_partials, online_softmax_step

BLOCK_S = 64
# One query tile of at most 16 rows (one decode step of a GQA group: T * G <= 16) is the decode
# kernel's attention tile, so it streams K/V in that kernel's tuned slot tiles (head_dim <= 128).
DECODE_BLOCK_S = AttendLaunch().block_s
# Largest T * G handled by one query tile (more falls back to the reference).
MAX_QUERY_ROWS = 128


@triton.jit
def _prefix_split_kernel(
    Q, K, V, Prefix_len, Out_part, M_part, L_part,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    n_splits, split_size, qk_scale,
    T: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    kv_heads = tl.num_programs(1)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < T * G
    q_rows = (head * G + offs_m // T) * stride_qh + (offs_m % T) * stride_qt
    q = tl.load(Q + row * stride_qb + q_rows[:, None] + offs_d[None, :], mask=m_mask[:, None], other=0.0)

    k_base = K + row * stride_kb + head * stride_kh
    v_base = V + row * stride_vb + head * stride_vh
    start = split * split_size
    end = tl.minimum(start + split_size, tl.load(Prefix_len + row))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for s0 in range(start, end, BLOCK_S):  # splits past the row's prefix skip the loop
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_range = offs_s < end
        k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=in_range[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_S], base-2 logits
        qk = tl.where(in_range[None, :], qk, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, qk, v)

    part = (row * kv_heads + head) * n_splits + split
    tl.store(Out_part + (part * BLOCK_M + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], acc)
    tl.store(M_part + part * BLOCK_M + offs_m, m_i)
    tl.store(L_part + part * BLOCK_M + offs_m, l_i)


@triton.jit
def _combine_kernel(
    Out, Q, K_draft, V_draft, Draft_mask, Out_part, M_part, L_part,
    stride_ob, stride_oh, stride_ot,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    n_splits, qk_scale,
    T: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    kv_heads = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < T * G
    query_t = offs_m % T

    # Prefix part: merge the split partials.
    parts = (row * kv_heads + head) * n_splits
    m_run, l_run, acc = merge_split_partials(Out_part, M_part, L_part, parts, n_splits, offs_m, m_mask, offs_d,
                                             BLOCK_M, BLOCK_M, HEAD_DIM, HEAD_DIM, SPLIT_CHUNK)  # fmt: skip

    # Draft part: the T draft keys of this KV head under the draft mask, folded into the same state.
    q_rows = (head * G + offs_m // T) * stride_qh + query_t * stride_qt
    q = tl.load(Q + row * stride_qb + q_rows[:, None] + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    k = tl.load(K_draft + row * stride_kb + head * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :],
                mask=t_mask[:, None], other=0.0)  # fmt: skip
    v = tl.load(V_draft + row * stride_vb + head * stride_vh + offs_t[:, None] * stride_vt + offs_d[None, :],
                mask=t_mask[:, None], other=0.0)  # fmt: skip
    if HAS_MASK:
        visible = tl.load(Draft_mask + query_t[:, None] * T + offs_t[None, :], mask=t_mask[None, :], other=0) != 0
    else:
        visible = offs_t[None, :] <= query_t[:, None]
    visible = visible & t_mask[None, :]
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    qk = tl.where(visible, qk, float("-inf"))
    _, l_run, acc = online_softmax_step(m_run, l_run, acc, qk, v)

    l_run = tl.where(l_run == 0.0, 1.0, l_run)
    out = acc / l_run[:, None]
    o_rows = (head * G + offs_m // T) * stride_oh + query_t * stride_ot
    tl.store(Out + row * stride_ob + o_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_mask[:, None])  # fmt: skip


def verify_attention_triton(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    prefix_len: torch.Tensor,
    k_draft: torch.Tensor,
    v_draft: torch.Tensor,
    draft_mask: torch.Tensor | None,
    scale: float,
    n_splits: int | None = None,
) -> torch.Tensor:
    """Triton implementation of `verify_attention_reference` (same arguments and result).

    ``n_splits`` overrides the split-K heuristic (tests use it to exercise many splits).
    Requires float16 / bfloat16 tensors with a contiguous last dim, ``D`` a power of two >= 16,
    ``T * G <= MAX_QUERY_ROWS`` and a contiguous ``prefix_len``.
    """
    batch, q_heads, length, head_dim = q.shape
    kv_heads, slots = k_prefix.shape[1], k_prefix.shape[2]
    group = q_heads // kv_heads
    block_m = max(16, triton.next_power_of_2(length * group))
    block_s = DECODE_BLOCK_S if block_m == 16 and head_dim <= 128 else BLOCK_S
    if n_splits is None:
        n_splits, split_size = plan_splits(batch, kv_heads, max(slots, 1), block_s, multiprocessor_count(q.device))
    else:
        split_size = math.ceil(math.ceil(max(slots, 1) / n_splits) / block_s) * block_s
        n_splits = math.ceil(max(slots, 1) / split_size)

    f32 = dict(dtype=torch.float32, device=q.device)
    out_part = torch.empty((batch, kv_heads, n_splits, block_m, head_dim), **f32)
    m_part = torch.empty((batch, kv_heads, n_splits, block_m), **f32)
    l_part = torch.empty((batch, kv_heads, n_splits, block_m), **f32)
    qk_scale = scale * LOG2E
    _prefix_split_kernel[(n_splits, kv_heads, batch)](
        q, k_prefix, v_prefix, prefix_len, out_part, m_part, l_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_prefix.stride(0), k_prefix.stride(1), k_prefix.stride(2),
        v_prefix.stride(0), v_prefix.stride(1), v_prefix.stride(2),
        n_splits, split_size, qk_scale,
        T=length, G=group, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_S=block_s,
        num_warps=4, num_stages=2,
    )  # fmt: skip

    out = q.new_empty(q.shape)  # contiguous, as the reference's output (the op's fake says so)
    mask = draft_mask.to(torch.int8).contiguous() if draft_mask is not None else m_part
    _combine_kernel[(kv_heads, batch)](
        out, q, k_draft, v_draft, mask, out_part, m_part, l_part,
        out.stride(0), out.stride(1), out.stride(2),
        q.stride(0), q.stride(1), q.stride(2),
        k_draft.stride(0), k_draft.stride(1), k_draft.stride(2),
        v_draft.stride(0), v_draft.stride(1), v_draft.stride(2),
        n_splits, qk_scale,
        T=length, G=group, BLOCK_M=block_m, BLOCK_T=max(16, triton.next_power_of_2(length)), HEAD_DIM=head_dim,
        SPLIT_CHUNK=min(triton.next_power_of_2(n_splits), max(1, 8192 // (block_m * head_dim))),
        HAS_MASK=draft_mask is not None,
        num_warps=4,
    )  # fmt: skip
    return out
