"""Fused decode step: attention over a fixed-size KV cache, slot importance and eviction choice.

The PyTorch reference beside this file (`decode_attention_reference.py`) defines the semantics
and the tensor shapes; this module computes the same thing in two Triton launches (three with
online re-allocation):

1. ``_attend_split_kernel`` (grid ``splits x Hkv x B``, flash-decoding split-K). Each program
   owns one KV head of one row and a contiguous range of slots. It loads the ``G`` query heads of
   its group once (one ``[BLOCK_G, D]`` tile, padded to 16 rows for ``tl.dot``; given RoPE tables,
   it normalises and rotates them and the new key itself, `_prepare_rows`), then streams its
   slots in ``[BLOCK_S, D]`` tiles of K and V: every K/V byte of the cache is read exactly once,
   for all query heads of the group. It keeps a running max / running sum (online softmax, float32)
   and writes the unnormalised partial output, the partial max and sum, and one fp16 per query
   head and slot for eviction: the base-2 logit (``STORED_LOGIT_DTYPE``; the reference rounds it
   the same way). (``||v_s||_1`` is not recomputed from V every
   step: it lives in the cache beside V, written once with the token. Recomputing it per tile
   measured 15-30% slower on an H100, from the second register layout V needs.) The write
   slot is skipped in the tiles; the program whose range holds it folds this step's token in from
   registers and stores its key/value/value norm/position into the cache, so no program reads what
   another writes and the K/V tiles reach the MMA unmodified. With one split per head (from about
   ``2 * SMs / Hkv`` rows up, where `plan_splits` wants no more) a program has seen the whole
   softmax and writes the final output itself. The logits go to rows padded to whole tiles of
   the scoring pass (`DecodePlan.logit_stride`), which therefore loads them without a slot mask.
   Split 0 of each selection scope also empties the scope's cell for the scoring pass.
2. ``_score_merge_kernel`` (grid ``(chunks + output programs) x Hsel x B``). Once all splits are
   done the softmax normalisers are known. A score-chunk program rebuilds them from the split
   partials (a few floats per query head) for every query head of its selection scope at once
   (all ``Hq`` heads when eviction is shared, else the ``G`` heads of one KV head), turns its
   chunk of logits into softmax weights (contribution scores: ``log2 p + log2 ||v_s||_1``
   combined by a log-sum-exp over the heads, the reference's log-space ranking; attention scores:
   summed weights), masks empty / protected / unusable slots and folds the chunk's lowest rank and
   its slot into the scope's cell with one atomic max of a packed int64 (`_pack_choice`); the
   last chunk to arrive (an atomic count) writes the scope's next write slot.
   The output programs, one per KV head of the scope and 32-column slice of the head dim, merge
   the split partials into the final output meanwhile (there are none with one split per head).
   With one split per head and ``overlap_scoring``, the pass runs on a side stream, beside the
   model's next kernels, and the next call joins it (`side_stream`).
   (Until 2026-12-05 both were a third launch, which an eager step pays for on the host;
   `bench/kernel_ab.py` times the two.)
3. ``_reallocate_kernel`` (grid ``B``, only with online re-allocation). The scoring pass then also
   keeps each chunk's second-lowest rank; one program per row reduces every head's two cheapest
   slots from the chunk pairs and moves one slot between two heads (`reallocate_one_slot` in the
   reference): a few scalars and one key/value row, so re-allocation is part of the step, on the
   device, and a CUDA graph replays it.

Ragged budgets (a different live limit per KV head in one physical allocation): splits and score
chunks are sized for the mean live budget (``planned_slots``) and launched over all physical
slots; programs past a head's live limit exit at once, and the scoring pass and the output merge
read only the live ones, so a ragged layer does the work of a uniform one of the same total.

Launch metadata (grids, split and chunk sizes, block sizes) depends only on the shape and is
planned once per shape (`plan_decode`); the scratch buffers of the passes (`DecodeWorkspace`) and
the launches (`DecodeLaunches`) are made per call, or kept by the caller from call to call (eager
decoding: ``workspaces``), whose later calls may then launch the compiled kernels directly
(`launch.py`).

Extra traffic over plain attention: ``G * 2`` bytes of logits per slot and KV head written and
read back, and ``4`` bytes of value norm read, against ``4 * D`` bytes of bf16 K/V (for G=4, D=128:
about 1.6% each way for the logits, 0.8% for the norm).
"""

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime import driver

from . import launch as kernel_launch
from . import side_stream
from .decode_attention_reference import LOG2E, STORED_LOGIT_DTYPE, check_new_token_preparation, check_reallocation
from .launch import KernelLaunch, launchable_directly
from .online_softmax import merge_split_partials, online_softmax_step

# Output columns merged by one output program: each (row, KV head) is merged by head_dim / 32
# programs, so a small batch still spreads over the GPU and all of a head's splits fit one load.
# Against one program per head (measured while the merge was a pass of its own),
# `bench/ragged_overhead.py` on an H100: uniform steps 2.8% faster (geomean of 12 shapes, 5-10% at
# batch 1), and ragged / uniform at batch 1 with 8192 slots per head 1.13 -> 1.04 (the ragged
# merge had taken 1.45x uniform's time there).
OUTPUT_D_SLICE = 32
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@dataclass(frozen=True)
class AttendLaunch:
    """Launch shape of the attention pass: slots per tile, warps, pipeline depth, the fewest
    tiles a split may hold, about how many waves of programs the splits aim for (`plan_splits`),
    and the most registers a thread may use (``max_registers``, Triton's ``maxnreg``; 0: the
    compiler's choice), which sets how many programs an SM holds at once.
    Defaults from the H100 sweep in ``bench/decode_op.py`` (``block_s`` is halved for head_dim 256
    to fit shared memory)."""

    block_s: int = 128
    num_warps: int = 4
    num_stages: int = 2
    min_tiles_per_split: int = 1
    waves: int = 2
    max_registers: int = 0


DEFAULT_ATTEND_LAUNCH = AttendLaunch()
"""The attention pass's launch shape where a call names none (benchmarks swap it to time another)."""


@dataclass(frozen=True)
class ScoreLaunch:
    """Launch shape of the scoring pass: the most slots per tile (``block``; fewer when many query
    heads share a tile, so that a tile holds at most ``tile_logits`` logits: 128 slots for shared
    eviction over 32 query heads), warps, and about how many score programs per SM cut each
    selection scope's slots into chunks (``programs_per_sm``). Powers of two, except the warps.
    Defaults from the H100 sweeps in ``bench/decode_op.py --score-sweep``. The first, at batch
    1-128: with a block of 256 and 8 warps the whole step took 1.04-1.12x as long with shared
    eviction and 1.06-1.18x per KV head (it varied ``block`` from 256 up, which shared eviction's
    tile cap overrode: there it compared warps only). The second (2026-12-06; batch 64 and 171,
    1,740 and 3,379 slots, both eviction scopes): 1, 2 or 8 warps, tiles of 2,048-8,192 logits,
    4-64 programs per SM. None beat these defaults by more than 3% (0.97-1.02x the step), and
    8 warps lost 1-19%."""

    block: int = 512
    num_warps: int = 4
    tile_logits: int = 4096
    programs_per_sm: int = 16

    def __post_init__(self) -> None:
        for name in ("block", "tile_logits", "programs_per_sm"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ScoreLaunch.{name} must be a power of two, got {value}")


@triton.jit
def _prepare_rows(x, partner, Norm_weight, offs_d, partner_d, cos, signed_sin, eps,
                  NORM: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """A new token's query or key rows ``x`` ``[..., D]`` (model dtype) after RMSNorm (``NORM``) and
    RoPE, rounded as the reference's `prepare_new_token`. ``partner``: the same rows with their
    halves swapped (what ``rotate_half`` pairs each column with), ``signed_sin``: ``sin`` negated
    over the first half (``rotate_half``'s sign)."""
    dtype = x.dtype
    x = x.to(tl.float32)
    partner = partner.to(tl.float32)
    if NORM:
        # The row's norm, shared by each column and its partner (the same row's other half).
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=-1, keep_dims=True) / HEAD_DIM + eps)
        weight = tl.load(Norm_weight + offs_d).to(tl.float32)
        partner_weight = tl.load(Norm_weight + partner_d).to(tl.float32)
        x = (weight * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        partner = (partner_weight * (partner * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return (x * cos + partner * signed_sin).to(dtype)


@triton.jit
def _attend_split_kernel(
    Q, K_new, V_new, K_cache, V_cache, Value_norm, Slot_pos, Write_slot, Position, Slot_limit,
    Out_part, M_part, L_part, Logits, Out, Choice, Cos, Sin, Q_norm_weight, K_norm_weight,
    stride_qb, stride_qh,
    stride_nkb, stride_nkh, stride_nvb, stride_nvh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_pb, stride_ph, stride_ob, stride_oh, stride_cos, stride_sin,
    n_splits, split_size, num_slots, logit_stride, n_sel, qk_scale, norm_eps,
    G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, FINAL: tl.constexpr,
    ROTATE: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    kv_heads = tl.num_programs(1)

    # Empty this step's selection cells (arrivals, best choice) for the scoring pass, which starts
    # after every program here ends: split 0 of each of the row's first ``n_sel`` heads empties one.
    if (split == 0) & (head < n_sel):
        tl.store(Choice + (row * n_sel + head) * 2 + tl.arange(0, 2), tl.zeros([2], tl.int64))

    limit = tl.load(Slot_limit + row * kv_heads + head)
    start = split * split_size
    # Splits past the head's live limit (ragged budgets) exit at once and write nothing: the
    # scoring pass and the output merge read only the live splits.
    if start >= limit:
        return
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < G

    # The group's query heads, loaded once for every slot of this split.
    q_rows = Q + row * stride_qb + (head * G + offs_g)[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    k_row = K_new + row * stride_nkb + head * stride_nkh
    k_new = tl.load(k_row + offs_d)
    v_new = tl.load(V_new + row * stride_nvb + head * stride_nvh + offs_d)
    if ROTATE:
        # The new token's norms and RoPE, here rather than in kernels of their own: a few hundred
        # bytes per program (the rows again with their halves swapped, cos, sin, norm weights).
        # The query's before the slots (they need it), the key's after them (only the token needs
        # it), so the slot stream waits for the query's alone.
        partner_d = (offs_d + HEAD_DIM // 2) % HEAD_DIM
        cos = tl.load(Cos + row * stride_cos + offs_d).to(tl.float32)
        sin = tl.load(Sin + row * stride_sin + offs_d).to(tl.float32)
        signed_sin = tl.where(offs_d < HEAD_DIM // 2, -sin, sin)
        q_partner = tl.load(q_rows + partner_d[None, :], mask=g_mask[:, None], other=0.0)
        q = _prepare_rows(q, q_partner, Q_norm_weight, offs_d, partner_d, cos, signed_sin, norm_eps, NORM, HEAD_DIM)
        k_partner = tl.load(k_row + partner_d)
    write_slot = tl.load(Write_slot + row * kv_heads + head)
    position = tl.load(Position + row)

    k_base = K_cache + row * stride_kb + head * stride_kh
    v_base = V_cache + row * stride_vb + head * stride_vh
    pos_base = Slot_pos + row * stride_pb + head * stride_ph
    logit_base = Logits + ((row * kv_heads + head) * G) * logit_stride
    end = tl.minimum(start + split_size, limit)

    # Cached slots. The write slot is skipped here: its old token is being replaced, and the new
    # token is folded in from registers below, so K/V tiles go from memory to the MMA untouched.
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    # Tiles past the head's live limit are not visited: a head with a small ragged budget reads
    # only its own slots (the trip count is read on the device, so CUDA graphs stay valid).
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_range = (offs_s < end) & (offs_s != write_slot)
        pos = tl.load(pos_base + offs_s, mask=in_range, other=-1)
        valid = in_range & (pos >= 0)
        k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=in_range[:, None], other=0.0)

        qk = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_S], base-2 logits
        qk = tl.where(valid[None, :], qk, float("-inf"))
        # Kept in L2 for the scoring pass, which reads them back right after (the K/V stream would
        # otherwise push them out: 0.94x the op's time at batch 64, `bench/kernel_ablation.py`).
        tl.store(logit_base + offs_g[:, None] * logit_stride + offs_s[None, :], qk.to(Logits.dtype.element_ty),
                 mask=g_mask[:, None] & in_range[None, :], eviction_policy="evict_last")  # fmt: skip
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, qk, v)

    if ROTATE:
        k_new = _prepare_rows(k_new, k_partner, K_norm_weight, offs_d, partner_d, cos, signed_sin, norm_eps, NORM,
                              HEAD_DIM)  # fmt: skip
    # This step's token: the program whose range holds the write slot attends to it, records its
    # logit, and commits its key, value, value norm and position to the cache.
    owns = (write_slot >= start) & (write_slot < end)
    qk_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale
    qk_new = tl.where(owns, qk_new, float("-inf"))
    m_new = tl.maximum(m_i, qk_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p_new = tl.exp2(qk_new - m_safe)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
    m_i = m_new
    tl.store(logit_base + offs_g * logit_stride + write_slot, qk_new.to(Logits.dtype.element_ty), mask=g_mask & owns)
    norm_new = tl.sum(tl.abs(v_new.to(tl.float32)), axis=0)
    tl.store(Value_norm + (row * kv_heads + head) * num_slots + write_slot, norm_new, mask=owns)
    tl.store(k_base + write_slot * stride_ks + offs_d, k_new, mask=owns & (offs_d < HEAD_DIM))
    tl.store(v_base + write_slot * stride_vs + offs_d, v_new, mask=owns & (offs_d < HEAD_DIM))
    tl.store(pos_base + write_slot, position, mask=owns)

    part = (row * kv_heads + head) * n_splits + split
    if FINAL:
        # One split per head: this program saw every slot, so its state is the whole softmax and the
        # output needs no merge (the division is the merge's, bit for bit: one split's scale is 1).
        out = acc / tl.where(g_mask, l_i, 1.0)[:, None]
        tl.store(Out + row * stride_ob + (head * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=g_mask[:, None])  # fmt: skip
    else:
        tl.store(Out_part + (part * G + offs_g)[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])
    tl.store(M_part + part * G + offs_g, m_i, mask=g_mask)
    tl.store(L_part + part * G + offs_g, l_i, mask=g_mask)


@triton.jit
def _pack_choice(rank, slot):
    """A chunk's choice (``rank`` float32, ``slot`` int32) as one positive int64 that is larger for a
    better choice: a lower rank, then among equal ranks a lower slot. ``atomic_max`` over these picks
    the lowest rank and the earliest slot among ties, as the reference's ``argmin``; 0 (an empty
    cell) is below every choice."""
    rank = tl.where(rank == 0.0, 0.0, rank)  # -0.0 and 0.0 tie, as floats compare
    bits = rank.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 that orders as the floats do
    key = ordered.to(tl.int64) + 2147483647 + 1  # [0, 2^32)
    return 0x7FFFFFFFFFFFFFFF - ((key << 31) + slot.to(tl.int64))  # slots are below 2^31


@triton.jit
def _merge_output_slice(
    Out, Out_part, M_part, L_part, Slot_limit, row, head, d_slice, kv_heads, n_splits, split_size,
    stride_ob, stride_oh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, D_SLICE: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):  # fmt: skip
    """The final output of the ``G`` query heads of KV head ``head`` in ``row``, columns ``d_slice *
    D_SLICE`` on: the merge of the head's live split partials (only splits below its limit wrote)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = d_slice * D_SLICE + tl.arange(0, D_SLICE)
    g_mask = offs_g < G
    live_splits = tl.cdiv(tl.load(Slot_limit + row * kv_heads + head), split_size)
    parts = (row * kv_heads + head) * n_splits
    _, l_run, acc = merge_split_partials(Out_part, M_part, L_part, parts, live_splits, offs_g, g_mask, offs_d,
                                         G, BLOCK_G, HEAD_DIM, D_SLICE, SPLIT_CHUNK)  # fmt: skip
    out = acc / tl.where(g_mask, l_run, 1.0)[:, None]
    tl.store(Out + row * stride_ob + (head * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=g_mask[:, None])  # fmt: skip


@triton.jit
def _score_merge_kernel(
    M_part, L_part, Logits, Value_norm, Slot_pos, Write_slot, Slot_limit, Accumulated,
    Chunk_min, Chunk_arg, Chunk_min2, Chunk_arg2, Out, Out_part, Choice,
    stride_pb, stride_ph, stride_ob, stride_oh,
    n_splits, split_size, num_slots, logit_stride, kv_heads, n_chunks, chunk_size, sink_tokens, recent_window,
    G: tl.constexpr, HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_SLICE: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    SCORE_KIND: tl.constexpr, ACCUMULATE: tl.constexpr, TOP2: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    sel = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    n_sel = tl.num_programs(1)
    if program >= n_chunks:
        # An output program: one 32-column slice of one KV head of the scope.
        slices: tl.constexpr = HEAD_DIM // D_SLICE
        unit = program - n_chunks
        _merge_output_slice(Out, Out_part, M_part, L_part, Slot_limit, row, sel * HEADS + unit // slices,
                            unit % slices, kv_heads, n_splits, split_size, stride_ob, stride_oh,
                            G, BLOCK_G, HEAD_DIM, D_SLICE, SPLIT_CHUNK)  # fmt: skip
        return
    chunk = program
    # Head `sel` stands for the layer when eviction is shared: all heads hold the same positions
    # and limits. Chunks past the live limit exit: the scope's choice waits for the live ones only.
    limit = tl.load(Slot_limit + row * kv_heads + sel)
    if chunk * chunk_size >= limit:
        return

    # Every query head of the selection scope at once, as [KV head, group head, slot] tiles: all
    # heads of the layer when eviction is shared, else the G heads of KV head `sel`.
    offs_h = tl.arange(0, BLOCK_H)
    offs_g = tl.arange(0, BLOCK_G)
    head = sel * HEADS + offs_h
    hg_mask = (offs_h < HEADS)[:, None] & (offs_g < G)[None, :]
    offs_p = tl.arange(0, BLOCK_SPLITS)
    part = ((row * kv_heads + head[:, None, None]) * n_splits + offs_p[None, None, :]) * G + offs_g[None, :, None]
    live_splits = tl.cdiv(tl.load(Slot_limit + row * kv_heads + head, mask=offs_h < HEADS, other=0), split_size)
    part_mask = hg_mask[:, :, None] & (offs_p[None, :] < live_splits[:, None])[:, None, :]
    m_p = tl.load(M_part + part, mask=part_mask, other=float("-inf"))
    l_p = tl.load(L_part + part, mask=part_mask, other=0.0)
    m_hg = tl.max(m_p, axis=2)
    m_hg = tl.where(m_hg == float("-inf"), 0.0, m_hg)
    inv_l = 1.0 / tl.where(hg_mask, tl.sum(l_p * tl.exp2(m_p - m_hg[:, :, None]), axis=2), 1.0)
    logit_rows = Logits + ((row * kv_heads + head[:, None]) * G + offs_g[None, :]) * logit_stride  # [BLOCK_H, BLOCK_G]
    norm_rows = Value_norm + (row * kv_heads + head) * num_slots  # [BLOCK_H]

    pos_base = Slot_pos + row * stride_pb + sel * stride_ph
    write_slot = tl.load(Write_slot + row * kv_heads + sel)
    # The step's position, where the attention pass stored it: the pass reads only the cache's
    # tensors, so it may run beside later kernels (`side_stream`) that reuse the caller's memory.
    position = tl.load(pos_base + write_slot)
    best_rank = tl.full([BLOCK], float("inf"), tl.float32)
    best_slot = tl.zeros([BLOCK], tl.int32)
    # TOP2: each lane also keeps its runner-up (second-lowest rank, earliest slot among ties).
    second_rank = tl.full([BLOCK], float("inf"), tl.float32)
    second_slot = tl.zeros([BLOCK], tl.int32)
    for s0 in range(chunk * chunk_size, tl.minimum((chunk + 1) * chunk_size, limit), BLOCK):
        offs_s = s0 + tl.arange(0, BLOCK)
        pos = tl.load(pos_base + offs_s, mask=offs_s < num_slots, other=-1)
        usable = offs_s < limit
        if SCORE_KIND == 2:
            score = pos.to(tl.float32)
        else:
            # Whole tiles (rows are padded to them: `DecodePlan.logit_stride`): no slot mask on the
            # load, so it moves adjacent logits as one vector; slots past the limit are masked after.
            logits = tl.load(logit_rows[:, :, None] + offs_s[None, None, :], mask=hg_mask[:, :, None],
                             other=float("-inf")).to(tl.float32)  # fmt: skip
            logits = tl.where(usable[None, None, :], logits, float("-inf"))
            if SCORE_KIND == 0:
                # log2 of p * ||v||_1 per head, then a log-sum-exp over the heads: the reference's
                # log-space ranking, immune to underflow ties.
                norm_mask = (offs_h < HEADS)[:, None] & usable[None, :]
                log_norm = tl.log2(tl.load(norm_rows[:, None] + offs_s[None, :], mask=norm_mask, other=1.0))
                terms = logits - m_hg[:, :, None] + tl.log2(inv_l)[:, :, None] + log_norm[:, None, :]
                top = tl.max(tl.max(terms, axis=1), axis=0)
                top_safe = tl.where(top == float("-inf"), 0.0, top)
                total = tl.sum(tl.sum(tl.exp2(terms - top_safe[None, None, :]), axis=1), axis=0)
                score = (top_safe + tl.log2(total)) * LN2
            else:
                weight = tl.sum(tl.exp2(logits - m_hg[:, :, None]) * inv_l[:, :, None], axis=1)  # [BLOCK_H, BLOCK]
                score = tl.sum(weight, axis=0)
                if ACCUMULATE:
                    acc_ptr = Accumulated + (row * n_sel + sel) * num_slots + offs_s
                    previous = tl.load(acc_ptr, mask=offs_s < num_slots, other=0.0)
                    score += tl.where(offs_s == write_slot, 0.0, previous)
                    tl.store(acc_ptr, score, mask=offs_s < num_slots)
        protected = (pos < sink_tokens) | (pos > position - recent_window)
        # Held tokens keep a finite rank (a zero value vector scores -inf in log space), so empty
        # slots always come first, as in the reference.
        rank = tl.where(protected, float("inf"), tl.maximum(score, -3.4028234663852886e38))
        rank = tl.where(pos < 0, float("-inf"), rank)
        rank = tl.where(usable, rank, float("inf"))
        better = rank < best_rank  # strict: the earliest slot wins ties, lanes scan slots in order
        if TOP2:
            runner_up = rank < second_rank
            second_slot = tl.where(better, best_slot, tl.where(runner_up, offs_s, second_slot))
            second_rank = tl.where(better, best_rank, tl.where(runner_up, rank, second_rank))
        best_slot = tl.where(better, offs_s, best_slot)
        best_rank = tl.where(better, rank, best_rank)
    chunk_min = tl.min(best_rank, axis=0)
    # Among lanes holding the minimum, the lowest slot: ties go to the earliest slot overall.
    slot = tl.min(tl.where(best_rank == chunk_min, best_slot, num_slots), axis=0)
    if TOP2:
        # Each chunk's lowest and runner-up, for the re-allocation pass: the runner-up is the
        # winning lane's runner-up or another lane's best.
        out = (row * n_sel + sel) * n_chunks + chunk
        tl.store(Chunk_min + out, chunk_min)
        tl.store(Chunk_arg + out, slot)
        winner = (best_rank == chunk_min) & (best_slot == slot)
        rank_2 = tl.where(winner, second_rank, best_rank)
        slot_2 = tl.where(winner, second_slot, best_slot)
        chunk_min2 = tl.min(rank_2, axis=0)
        tl.store(Chunk_min2 + out, chunk_min2)
        tl.store(Chunk_arg2 + out, tl.min(tl.where(rank_2 == chunk_min2, slot_2, num_slots), axis=0))

    # The scope's next write slot, without another launch: every live chunk folds its choice into
    # the scope's cell (``Choice[row, sel]``: arrivals, best packed choice; the attention pass
    # emptied it), then counts itself in (release: its choice is visible first); the last to
    # arrive reads the best choice (acquire: it sees every choice) and writes the slot.
    cell = Choice + (row * n_sel + sel) * 2
    tl.atomic_max(cell + 1, _pack_choice(chunk_min, slot), sem="relaxed", scope="gpu")
    if tl.atomic_add(cell, 1, sem="acq_rel", scope="gpu") == tl.cdiv(limit, chunk_size) - 1:
        best = tl.atomic_add(cell + 1, 0, sem="acquire", scope="gpu")
        chosen = (0x7FFFFFFFFFFFFFFF - best) & 0x7FFFFFFF
        tl.store(Write_slot + row * kv_heads + head, chosen.to(Write_slot.dtype.element_ty), mask=offs_h < HEADS)


@triton.jit
def _reallocate_kernel(
    K_cache, V_cache, Value_norm, Slot_pos, Write_slot, Position, Slot_limit,
    Chunk_min, Chunk_arg, Chunk_min2, Chunk_arg2,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_pb, stride_ph,
    kv_heads, num_slots, n_chunks, chunk_size, reallocate_every, min_limit,
    HEAD_DIM: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    if tl.load(Position + row) % reallocate_every != 0:
        return
    # Every head's two cheapest slots, from its chunks' (lowest, runner-up) pairs: [heads, chunks].
    offs_h = tl.arange(0, BLOCK_HKV)
    offs_k = tl.arange(0, BLOCK_CHUNKS)
    h_mask = offs_h < kv_heads
    limit = tl.load(Slot_limit + row * kv_heads + offs_h, mask=h_mask, other=0)
    pairs = (row * kv_heads + offs_h[:, None]) * n_chunks + offs_k[None, :]
    live = h_mask[:, None] & (offs_k[None, :] < tl.cdiv(limit, chunk_size)[:, None])
    lowest = tl.load(Chunk_min + pairs, mask=live, other=float("inf"))
    cheapest = tl.min(lowest, axis=1)
    winner = offs_k[None, :] == tl.argmin(lowest, axis=1)[:, None]  # first chunk: the lowest slot
    rank_2 = tl.where(winner, tl.load(Chunk_min2 + pairs, mask=live, other=float("inf")), lowest)
    lowest_slot = tl.load(Chunk_arg + pairs, mask=live, other=0)
    slot_2 = tl.where(winner, tl.load(Chunk_arg2 + pairs, mask=live, other=0), lowest_slot)
    second = tl.min(rank_2, axis=1)
    second_slot = tl.min(tl.where(rank_2 == second[:, None], slot_2, num_slots), axis=1)

    loss = tl.where(h_mask & (limit - 1 >= min_limit), second, float("inf"))
    gain = tl.where(h_mask & (limit + 1 <= num_slots), cheapest, float("-inf"))
    donor = tl.argmin(loss, axis=0)
    recipient = tl.argmax(gain, axis=0)
    if (donor == recipient) | (tl.max(gain, axis=0) <= tl.min(loss, axis=0)):
        return

    # Donor: its last live slot leaves the range; the token there fills the slot vacated now.
    donor_limit = tl.sum(tl.where(offs_h == donor, limit, 0), axis=0)
    last = donor_limit - 1
    head_slot = Write_slot + row * kv_heads + donor
    cheapest_slot = tl.load(head_slot)
    runner_up = tl.sum(tl.where(offs_h == donor, second_slot, 0), axis=0)
    vacated = tl.where(cheapest_slot == last, cheapest_slot, runner_up)
    moved = vacated != last
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = moved & (offs_d < HEAD_DIM)
    k_row = K_cache + row * stride_kb + donor * stride_kh
    v_row = V_cache + row * stride_vb + donor * stride_vh
    tl.store(k_row + vacated * stride_ks + offs_d, tl.load(k_row + last * stride_ks + offs_d), mask=row_mask)
    tl.store(v_row + vacated * stride_vs + offs_d, tl.load(v_row + last * stride_vs + offs_d), mask=row_mask)
    norm_row = Value_norm + (row * kv_heads + donor) * num_slots
    tl.store(norm_row + vacated, tl.load(norm_row + last), mask=moved)
    pos_row = Slot_pos + row * stride_pb + donor * stride_ph
    tl.store(pos_row + vacated, tl.load(pos_row + last), mask=moved)
    tl.store(pos_row + last, -1)
    tl.store(head_slot, tl.where(cheapest_slot == last, runner_up, cheapest_slot))
    tl.store(Slot_limit + row * kv_heads + donor, last)
    # Recipient: its first slot past the old limit (empty) is where its next token goes.
    recipient_limit = tl.sum(tl.where(offs_h == recipient, limit, 0), axis=0)
    tl.store(Write_slot + row * kv_heads + recipient, recipient_limit)
    tl.store(Slot_limit + row * kv_heads + recipient, recipient_limit + 1)


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 off the GPU, for the interpreter); read once per device."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def plan_splits(
    batch: int,
    kv_heads: int,
    slots: int,
    block_s: int,
    num_sms: int,
    min_tiles_per_split: int = 4,
    planned_slots: int = 0,
    waves: int = 2,
) -> tuple[int, int]:
    """Choose (n_splits, split_size) so that about ``waves`` waves of programs (one an SM each)
    cover the GPU, with at least ``min_tiles_per_split * block_s`` slots per split.

    The split size is planned for ``planned_slots`` live slots per head (0: all ``slots``), and
    as many splits as cover all ``slots`` are launched. With ragged budgets the planned count is
    the mean live budget: each program then holds no more slots than under uniform budgets of the
    same total, a head above the mean spreads over more programs, and splits past a head's live
    limit exit at once (sizing splits by the physical slots instead made every program longer).
    """
    planned = min(planned_slots or slots, slots)
    wanted = max(1, math.ceil(waves * num_sms / (batch * kv_heads)))
    most = max(1, math.ceil(planned / (min_tiles_per_split * block_s)))
    n_splits = min(wanted, most)
    split_size = math.ceil(math.ceil(planned / n_splits) / block_s) * block_s
    return math.ceil(slots / split_size), split_size


def _plan_chunks(
    selectors: int, slots: int, block: int, num_sms: int, planned_slots: int = 0, programs_per_sm: int = 16
) -> tuple[int, int]:
    """(chunk_size, n_chunks) for the scoring pass: about ``programs_per_sm`` programs per SM, whole
    tiles each; chunks sized for ``planned_slots`` live slots (0: all), as many as cover all ``slots``.
    (Short programs keep the tail even when ragged heads hold different numbers of chunks:
    sixteen measured 3-4% faster than four for ragged budgets at batch 32-128 on an H100,
    and no slower for uniform ones; `bench/ragged_overhead.py`.)"""
    tiles = math.ceil(min(planned_slots or slots, slots) / block)
    n_chunks = min(tiles, max(1, math.ceil(programs_per_sm * num_sms / selectors)))
    chunk_size = math.ceil(tiles / n_chunks) * block
    return chunk_size, math.ceil(slots / chunk_size)


@dataclass(frozen=True, eq=False)
class DecodePlan:
    """Everything about a decode step's two (three) launches that depends only on its shape and
    settings: grids, split and chunk sizes, block sizes and warps. `plan_decode` computes it
    once per shape, so an eager call does no planning (flashinfer's plan / run split). Plans
    compare by identity (cheap to look up): `plan_decode` returns one object per shape.

    Shape: ``batch`` B, ``kv_heads`` Hkv, ``group`` G query heads per KV head, ``slots`` S,
    ``head_dim`` D; ``top2``: the scoring pass keeps runner-ups (online re-allocation).
    """

    batch: int
    kv_heads: int
    group: int
    slots: int
    head_dim: int
    top2: bool
    # attention pass
    n_splits: int
    split_size: int
    block_g: int
    block_s: int
    attend_warps: int
    attend_stages: int
    attend_max_registers: int
    # scoring pass
    n_sel: int
    heads: int
    block_h: int
    score_g: int
    score_block: int
    score_warps: int
    chunk_size: int
    n_chunks: int
    block_splits: int
    # output programs of the scoring pass
    d_slice: int
    split_chunk: int
    # re-allocation pass
    block_chunks: int

    @property
    def logit_stride(self) -> int:
        """Row stride of the logits scratch: ``slots`` rounded up to whole scoring tiles. Every tile of
        the scoring pass then lies inside its row, so it loads with no slot mask (slots past the
        limit are masked after the load), and as the stride and the tiles' starts are multiples of
        16, which Triton specializes on, adjacent logits move as one vector access. (With the
        budget as the stride, 921, 1,740, 3,379, ..., and a mask per slot, each logit was a load.)"""
        return self.score_block * math.ceil(self.slots / self.score_block)

    @property
    def attend_writes_output(self) -> bool:
        """One split per head: the attention pass writes the output, and no merge is launched."""
        return self.n_splits == 1


@functools.lru_cache(maxsize=1024)
def plan_decode(
    batch: int,
    kv_heads: int,
    group: int,
    slots: int,
    head_dim: int,
    num_sms: int,
    shared: bool,
    planned_slots: int = 0,
    top2: bool = False,
    n_splits: int | None = None,
    launch: AttendLaunch | None = None,
    score_launch: ScoreLaunch | None = None,
) -> DecodePlan:
    """The `DecodePlan` of one shape (cached: the same arguments give the same object)."""
    launch = launch or AttendLaunch()
    score_launch = score_launch or ScoreLaunch()
    block_s = launch.block_s if head_dim <= 128 else launch.block_s // 2
    if n_splits is None:
        n_splits, split_size = plan_splits(
            batch, kv_heads, slots, block_s, num_sms, launch.min_tiles_per_split, planned_slots, launch.waves
        )
    else:
        split_size = math.ceil(math.ceil(slots / n_splits) / block_s) * block_s
        n_splits = math.ceil(slots / split_size)
    n_sel = 1 if shared else kv_heads
    heads = kv_heads if shared else 1
    block_h, score_g = triton.next_power_of_2(heads), max(2, triton.next_power_of_2(group))
    score_block = min(score_launch.block, max(16, score_launch.tile_logits // (block_h * score_g)))
    chunk_size, n_chunks = _plan_chunks(
        batch * n_sel, slots, score_block, num_sms, planned_slots, score_launch.programs_per_sm
    )
    d_slice = min(OUTPUT_D_SLICE, head_dim)
    return DecodePlan(
        batch=batch, kv_heads=kv_heads, group=group, slots=slots, head_dim=head_dim, top2=top2,
        n_splits=n_splits, split_size=split_size, block_g=max(16, triton.next_power_of_2(group)), block_s=block_s,
        attend_warps=launch.num_warps, attend_stages=launch.num_stages, attend_max_registers=launch.max_registers,
        n_sel=n_sel, heads=heads, block_h=block_h, score_g=score_g, score_block=score_block,
        score_warps=score_launch.num_warps, chunk_size=chunk_size, n_chunks=n_chunks,
        block_splits=max(2, triton.next_power_of_2(n_splits)),
        d_slice=d_slice,
        # All splits in one load (up to 8192 floats: 64 registers a thread), so a head above the
        # mean budget costs no extra trip.
        split_chunk=min(triton.next_power_of_2(n_splits), max(1, 8192 // (score_g * d_slice))),
        block_chunks=max(2, triton.next_power_of_2(n_chunks)),
    )  # fmt: skip


@dataclass(frozen=True)
class DecodeWorkspace:
    """Scratch of one decode step (float32 unless noted; P = ``n_splits``, C = ``n_chunks``):
    ``out_part`` ``[B, Hkv, P, G, D]`` (only for P > 1), ``m_part`` / ``l_part`` ``[B, Hkv, P, G]``
    split partials; ``logits`` ``[B, Hkv, G, S']`` base-2 logits in ``STORED_LOGIT_DTYPE`` (fp16; ``S'``:
    `DecodePlan.logit_stride`);
    ``choice`` ``[B, Hsel, 2]`` int64: per selection scope, the score chunks arrived so far and
    their best packed choice (`_pack_choice`), emptied by the attention pass of every step;
    with ``top2`` (online re-allocation) also ``chunk_min`` ``[B, Hsel, C]`` and ``chunk_arg``
    (int32), each score chunk's lowest rank and its slot, and ``chunk_min2`` / ``chunk_arg2`` the
    runner-ups (without it ``choice`` stands in for all four, unused).

    Every pass reads only what an earlier pass of the same step wrote (live splits, usable slots,
    live chunks, emptied cells), so the buffers start uninitialised (no fill kernel under a CUDA
    graph) and a workspace can serve step after step, and layer after layer on one stream (a call
    first joins a scoring pass the previous call left on the side stream).
    """

    out_part: torch.Tensor
    m_part: torch.Tensor
    l_part: torch.Tensor
    logits: torch.Tensor
    choice: torch.Tensor
    chunk_min: torch.Tensor
    chunk_arg: torch.Tensor
    chunk_min2: torch.Tensor
    chunk_arg2: torch.Tensor

    @classmethod
    def allocate(cls, plan: DecodePlan, device: torch.device) -> "DecodeWorkspace":
        f32 = dict(dtype=torch.float32, device=device)
        batch, kv_heads, group = plan.batch, plan.kv_heads, plan.group
        choice = torch.empty((batch, plan.n_sel, 2), dtype=torch.int64, device=device)
        chunks = (batch, plan.n_sel, plan.n_chunks)
        top2 = plan.top2
        m_part = torch.empty((batch, kv_heads, plan.n_splits, group), **f32)
        return cls(
            # With one split per head the attention pass writes the output: m_part stands in, unused.
            out_part=m_part
            if plan.attend_writes_output
            else torch.empty((batch, kv_heads, plan.n_splits, group, plan.head_dim), **f32),
            m_part=m_part,
            l_part=torch.empty((batch, kv_heads, plan.n_splits, group), **f32),
            logits=torch.empty((batch, kv_heads, group, plan.logit_stride), dtype=STORED_LOGIT_DTYPE, device=device),
            choice=choice,
            chunk_min=torch.empty(chunks, **f32) if top2 else choice,
            chunk_arg=torch.empty(chunks, dtype=torch.int32, device=device) if top2 else choice,
            chunk_min2=torch.empty(chunks, **f32) if top2 else choice,
            chunk_arg2=torch.empty(chunks, dtype=torch.int32, device=device) if top2 else choice,
        )


@dataclass(frozen=True, eq=False)
class DecodeLaunches:
    """A decode step's scratch buffers and its two (three) launches, for one plan, argument layout
    (dtypes, strides) and settings; eager callers keep it from call to call (``workspaces``)."""

    work: DecodeWorkspace
    attend: KernelLaunch
    score_merge: KernelLaunch
    reallocate: KernelLaunch | None

    @classmethod
    def prepare(
        cls, plan: DecodePlan, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
        v_cache: torch.Tensor, slot_pos: torch.Tensor, scale: float, sink_tokens: int, recent_window: int,
        score_kind: int, accumulate: bool, reallocate_every: int, min_limit: int, cos: torch.Tensor | None,
        sin: torch.Tensor | None, q_norm_weight: torch.Tensor | None, norm_eps: float,
    ) -> "DecodeLaunches":  # fmt: skip
        batch, kv_heads, group, slots, head_dim = plan.batch, plan.kv_heads, plan.group, plan.slots, plan.head_dim
        k_strides, v_strides, pos_strides = k_cache.stride()[:3], v_cache.stride()[:3], slot_pos.stride()[:2]
        # The output is contiguous (`decode_attention_triton` allocates it like q's shape).
        out_strides = (q.shape[1] * head_dim, head_dim)
        rotate = cos is not None
        table_strides = (cos.stride(0), sin.stride(0)) if rotate else (0, 0)
        attend = KernelLaunch(
            _attend_split_kernel, (plan.n_splits, kv_heads, batch),
            (*q.stride()[:2], *k_new.stride()[:2], *v_new.stride()[:2], *k_strides, *v_strides, *pos_strides,
             *out_strides, *table_strides, plan.n_splits, plan.split_size, slots, plan.logit_stride, plan.n_sel,
             scale * LOG2E, norm_eps),
            dict(G=group, BLOCK_G=plan.block_g, HEAD_DIM=head_dim, BLOCK_S=plan.block_s,
                 FINAL=plan.attend_writes_output, ROTATE=rotate, NORM=q_norm_weight is not None),
            num_warps=plan.attend_warps, num_stages=plan.attend_stages,
            **({"maxnreg": plan.attend_max_registers} if plan.attend_max_registers else {}),
        )  # fmt: skip
        # Per selection scope, its score chunks, then one output program per KV head of the scope
        # and 32-column slice, unless the attention pass wrote the output (one split per head).
        output_programs = 0 if plan.attend_writes_output else plan.heads * (head_dim // plan.d_slice)
        score_merge = KernelLaunch(
            _score_merge_kernel, (plan.n_chunks + output_programs, plan.n_sel, batch),
            (*pos_strides, *out_strides, plan.n_splits, plan.split_size, slots, plan.logit_stride,
             kv_heads, plan.n_chunks, plan.chunk_size, sink_tokens, recent_window),
            dict(G=group, HEADS=plan.heads, BLOCK_H=plan.block_h, BLOCK_G=plan.score_g,
                 BLOCK_SPLITS=plan.block_splits, BLOCK=plan.score_block, HEAD_DIM=head_dim, D_SLICE=plan.d_slice,
                 SPLIT_CHUNK=plan.split_chunk, SCORE_KIND=int(score_kind), ACCUMULATE=accumulate, TOP2=plan.top2),
            num_warps=plan.score_warps,
        )  # fmt: skip
        reallocate = None
        if reallocate_every:
            reallocate = KernelLaunch(
                _reallocate_kernel, (batch,),
                (*k_strides, *v_strides, *pos_strides, kv_heads, slots, plan.n_chunks, plan.chunk_size,
                 reallocate_every, min_limit),
                dict(HEAD_DIM=head_dim, BLOCK_HKV=max(2, triton.next_power_of_2(kv_heads)),
                     BLOCK_CHUNKS=plan.block_chunks),
                num_warps=1,
            )  # fmt: skip
        return cls(DecodeWorkspace.allocate(plan, q.device), attend, score_merge, reallocate)


def decode_attention_triton(
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
    *,
    n_splits: int | None = None,
    launch: AttendLaunch | None = None,
    score_launch: ScoreLaunch | None = None,
    workspaces: dict | None = None,
) -> torch.Tensor:
    """Triton implementation of `decode_attention_reference` (same arguments and result).

    ``planned_slots`` (the mean live budget per head when budgets are ragged, 0 otherwise) sizes
    the splits and score chunks (`plan_splits`); it never changes the result.
    ``reallocate_every`` and ``min_limit``: online re-allocation, as in the reference.
    ``cos``, ``sin``, ``q_norm_weight``, ``k_norm_weight``, ``norm_eps``: the new token's RoPE and
    norms, as in the reference, done by the attention pass's programs as they load the token.
    ``overlap_scoring``: the scoring pass may run on a side stream, beside whatever the caller
    launches next, where the attention pass writes the output (one split per head) and nothing
    re-allocates (`side_stream`; the result is the same). The caller must then make another call of
    this function (which joins it first) before anything else reads the cache's tensors.
    ``n_splits`` overrides the split-K heuristic (tests use it to exercise many splits);
    ``launch`` and ``score_launch`` override the attention and scoring passes' launch shapes
    (the benchmark sweeps them). ``workspaces``: a dict in which the step keeps its scratch
    buffers and launches (`DecodeLaunches`, one per plan, argument layout, settings and device)
    from call to call instead of allocating them, for eager decoding; it must only be used by
    calls in stream order (not while a CUDA graph captures, whose memory is private). With it, and
    ``launch.DIRECT_LAUNCH``, repeated calls on a GPU launch the compiled kernels directly
    (`KernelLaunch`). The result is the same bit for bit either way.
    Requires ``q`` / caches in float16 or bfloat16, ``D`` a power of two >= 16, last dims
    contiguous, and contiguous ``slot_pos`` / ``write_slot`` / ``slot_limit`` / ``position``.
    """
    check_reallocation(reallocate_every, shared, accumulated)
    check_new_token_preparation(q, cos, sin, q_norm_weight, k_norm_weight)
    batch, kv_heads, slots, head_dim = k_cache.shape
    device = q.device
    plan = plan_decode(batch, kv_heads, q.shape[1] // kv_heads, slots, head_dim, multiprocessor_count(device),
                       shared, planned_slots, reallocate_every > 0, n_splits, launch or DEFAULT_ATTEND_LAUNCH,
                       score_launch)  # fmt: skip
    inputs = (q, k_new, v_new, k_cache, v_cache, value_norm, slot_pos, write_slot, position, slot_limit)
    # The new token's RoPE tables and norm weights (q stands in for absent ones: never read).
    prepared = (q if cos is None else cos, q if sin is None else sin, q if q_norm_weight is None else q_norm_weight,
                q if k_norm_weight is None else k_norm_weight)  # fmt: skip
    current_device = torch.cuda.current_device() if q.is_cuda else None
    # What the launches depend on besides the plan: every tensor's dtype (the kernels specialize on
    # it), the strides they take as arguments, and the settings. Written out as one tuple, not built
    # by generators: an eager call at batch 1 is host-bound, and this is looked up every call.
    key = None if workspaces is None else (
        plan, device, current_device, q.dtype, k_new.dtype, v_new.dtype, k_cache.dtype, v_cache.dtype,
        value_norm.dtype, slot_pos.dtype, write_slot.dtype, position.dtype, slot_limit.dtype, prepared[0].dtype,
        prepared[1].dtype, prepared[2].dtype, prepared[3].dtype, accumulated is None or accumulated.dtype,
        q.stride(), k_new.stride(), v_new.stride(), k_cache.stride(), v_cache.stride(), value_norm.stride(),
        slot_pos.stride(), prepared[0].stride(), prepared[1].stride(), cos is None, q_norm_weight is None,
        scale, sink_tokens, recent_window, score_kind, reallocate_every, min_limit, norm_eps)  # fmt: skip
    if key is None or (step := workspaces.get(key)) is None:
        step = DecodeLaunches.prepare(plan, q, k_new, v_new, k_cache, v_cache, slot_pos, scale, sink_tokens,
                                      recent_window, score_kind, accumulated is not None, reallocate_every, min_limit,
                                      cos, sin, q_norm_weight, norm_eps)  # fmt: skip
        if key is not None:
            workspaces[key] = step
    work = step.work
    out = q.new_empty(q.shape)  # contiguous, as the reference's output (the op's fake says so)
    # Direct launches only with kept launches (the scratch buffers are the allocator's, on q's device: aligned).
    direct = workspaces is not None and kernel_launch.DIRECT_LAUNCH and q.is_cuda
    direct = direct and launchable_directly(
        current_device, *inputs, *prepared, out, *(() if accumulated is None else (accumulated,))
    )
    stream = driver.active.get_current_stream(current_device) if direct else None  # looked up once a step

    side_stream.join()  # the previous call's scoring pass, if it ran beside (it may share the workspace)
    step.attend(*inputs, work.out_part, work.m_part, work.l_part, work.logits, out, work.choice, *prepared,
                direct=direct, stream=stream)  # fmt: skip
    # Beside the model's next kernels only where it writes no output (the attention pass did) and no
    # re-allocation follows it in this step.
    overlap = (overlap_scoring and side_stream.OVERLAP_SCORING and plan.attend_writes_output
               and step.reallocate is None and q.is_cuda)  # fmt: skip
    with side_stream.beside(overlap, keep=step) as side:
        step.score_merge(work.m_part, work.l_part, work.logits, value_norm, slot_pos, write_slot, slot_limit,
                         work.m_part if accumulated is None else accumulated, work.chunk_min, work.chunk_arg,
                         work.chunk_min2, work.chunk_arg2, out, work.out_part, work.choice, direct=direct,
                         stream=stream if side is None else side.cuda_stream)  # fmt: skip
    if step.reallocate is not None:
        step.reallocate(k_cache, v_cache, value_norm, slot_pos, write_slot, position, slot_limit,
                        work.chunk_min, work.chunk_arg, work.chunk_min2, work.chunk_arg2, direct=direct,
                        stream=stream)  # fmt: skip
    return out
