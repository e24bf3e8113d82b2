"""Triton building blocks shared by the split-K attention kernels (decode and verification).

Both keep a flash-attention running state per query row, in float32 and base 2: the running max
``m`` ``[R]``, the running sum ``l`` ``[R]`` and the unnormalised output ``acc`` ``[R, D]``; a row
that has seen nothing valid yet holds ``m = -inf``, ``l = 0``, ``acc = 0``.
"""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(m_i, l_i, acc, qk, v):
    """Fold one tile into the running state: ``qk`` ``[R, S]`` base-2 logits (masked entries
    ``-inf``), ``v`` ``[S, D]`` the tile's values. Returns the new ``(m, l, acc)``."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid seen yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def merge_split_partials(
    Out_part, M_part, L_part, parts, n_splits, offs_r, r_mask, offs_d,
    ROWS: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):  # fmt: skip
    """Merge the split-K partials of one (row, KV head) into one running state ``(m, l, acc)``.

    Split ``s`` of the program stored ``ROWS`` query rows at ``(parts + s) * ROWS + r`` in
    ``M_part`` / ``L_part`` (and times ``HEAD_DIM`` in ``Out_part``); ``offs_r`` ``[BLOCK_R]``
    picks the rows, ``r_mask`` the real ones, ``offs_d`` ``[BLOCK_D]`` the output columns merged
    (all ``HEAD_DIM``, or a slice of them). ``SPLIT_CHUNK`` splits are loaded at a time
    (``[SPLIT_CHUNK, BLOCK_R, BLOCK_D]`` loads in flight together); ``acc`` is ``[BLOCK_R, BLOCK_D]``.
    """
    offs_c = tl.arange(0, SPLIT_CHUNK)
    m_run = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s0 in range(0, n_splits, SPLIT_CHUNK):
        split = s0 + offs_c
        mask = (split < n_splits)[:, None] & r_mask[None, :]
        index = (parts + split[:, None]) * ROWS + offs_r[None, :]
        m_s = tl.load(M_part + index, mask=mask, other=float("-inf"))
        l_s = tl.load(L_part + index, mask=mask, other=0.0)
        o_s = tl.load(Out_part + index[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=mask[:, :, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_safe)
        beta = tl.exp2(m_s - m_safe[None, :])
        l_run = l_run * alpha + tl.sum(l_s * beta, axis=0)
        acc = acc * alpha[:, None] + tl.sum(o_s * beta[:, :, None], axis=0)
        m_run = m_new
    return m_run, l_run, acc
