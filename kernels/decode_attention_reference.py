"""Plain PyTorch reference for the fused decode step (`kernels/decode_attention.py`).

One decode step of one attention layer over a fixed-size KV cache:

1. write the new token's key/value (and its position) into the slot chosen at the previous step;
2. attend with the current query over the valid slots (softmax in float32);
3. score every slot from this pass's own intermediates and pick the slot to overwrite next.

Shapes (B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, S slots, D head dim):

- ``q``: ``[B, Hq, D]``; ``k_new``, ``v_new``: ``[B, Hkv, D]``; ``q`` and ``k_new`` already rotated
  by RoPE, unless ``cos`` / ``sin`` are given (below)
- ``k_cache``, ``v_cache``: ``[B, Hkv, S, D]``, mutated in place
- ``value_norm``: ``[B, Hkv, S]`` float32, ``||v_s||_1`` of each slot's value, kept beside the values
  (computed once when a token is written, not re-read from V every step); mutated in place
- ``slot_pos``: ``[B, Hkv, S]`` int32, the sequence position held by each slot, ``-1`` when empty;
  mutated in place
- ``write_slot``: ``[B, Hkv]`` int32, slot that receives this step's token; overwritten in place
  with the slot the next step will write
- ``position``: ``[B]`` int32, sequence position of this step's token
- ``slot_limit``: ``[B, Hkv]`` int32, number of usable slots per head (ragged budgets); slots at
  or past the limit are never attended, written or chosen
- ``accumulated``: optional ``[B, Hsel, S]`` float32 running score (``Hsel`` is 1 when eviction is
  shared by the layer's heads, else ``Hkv``); mutated in place

The returned attention output is ``[B, Hq, D]`` in ``q``'s dtype.

The new token's RMSNorm and RoPE (optional, `prepare_new_token`): given ``cos`` and ``sin``
``[B, D]`` (transformers' rotary embedding at this step's positions), the step first rotates
``q`` and ``k_new``, and before that, given ``q_norm_weight`` and ``k_norm_weight`` ``[D]`` (Qwen3's
q/k norms), normalises each head's row. The key is cached rotated.

Scores (``score_kind``):

- ``CONTRIBUTION`` (LongFlow): ``sum_g p[g, s] * ||v_s||_1``, the size of slot ``s``'s
  contribution to this step's output, summed over the query heads of the group. It is ranked in
  log space (``logsumexp_g(log p[g, s]) + log ||v_s||_1``, base 2 in the kernel): the same order,
  but sharply focused attention cannot underflow many slots to an exact 0 and turn the choice
  into a tie won by the lowest slot (in practice: the prompt);
- ``ATTENTION`` (H2O-style): ``sum_g p[g, s]``;
- ``POSITION`` (StreamingLLM-style): the slot's sequence position, so the oldest goes first.

Scores are computed from each slot's base-2 logit rounded to ``STORED_LOGIT_DTYPE`` (fp16), as
the kernel hands its logits from the attention pass to the scoring pass, over the float32 softmax
normalisers (`stored_log2_probs`); the output's softmax stays float32 throughout.

With shared eviction the per-head scores are summed over the layer's KV heads and every head
gets the same slot. When ``accumulated`` is given (attention scores only: the others ignore it),
the step score is added to it (the slot just written starts from zero) and eviction ranks the
running total. Empty slots are chosen before any token is evicted; sink tokens
(``position < sink_tokens``) and the ``recent_window`` newest tokens are never chosen. Ties go to
the lowest slot index.
"""

from enum import IntEnum

import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
STORED_LOGIT_DTYPE = torch.float16
"""The dtype of the logits between the kernel's two passes. Against float32: 0.96x the op's time where
the logits miss L2 (batch 128 at 921 slots, batch 64 at 1,740; H100), 1.01x where they fit, and
0.10-0.15% of LongFlow's choices changed on SmolLM2, each between near-equal slots
(docs/results/kernels_throughput.md, fifteenth run and "fp16 logits")."""


class ScoreKind(IntEnum):
    """How the fused step ranks cached slots for eviction."""

    CONTRIBUTION = 0
    ATTENTION = 1
    POSITION = 2


def rank_slots(
    score: torch.Tensor,
    slot_pos: torch.Tensor,
    usable: torch.Tensor,
    position: torch.Tensor,
    sink_tokens: int,
    recent_window: int,
) -> torch.Tensor:
    """Turn scores into eviction ranks: empty slots ``-inf`` (strictly first), protected or unusable
    ``+inf``.

    ``score``, ``slot_pos`` and ``usable`` are ``[B, H, S]``; ``position`` is ``[B]``.
    """
    recent_floor = position.view(-1, 1, 1) - recent_window
    protected = (slot_pos < sink_tokens) | (slot_pos > recent_floor)
    # A held token's score stays finite (a zero value vector has log-contribution -inf), so an
    # empty slot always ranks strictly first.
    held = score.float().clamp_min(torch.finfo(torch.float32).min)
    rank = torch.where(protected, torch.inf, held)
    rank = torch.where(slot_pos < 0, -torch.inf, rank)
    return torch.where(usable, rank, torch.inf)


def stored_log2_probs(logits: torch.Tensor, stored_dtype: torch.dtype = STORED_LOGIT_DTYPE) -> torch.Tensor:
    """Base-2 log softmax weights as the kernel's scoring pass sees them: each logit, in base 2,
    rounded to ``stored_dtype``, less the float32 log-normaliser of the unrounded logits (the
    attention pass keeps its running max and sum in float32 registers).

    ``logits`` ``[..., S]`` float32 natural-log logits, masked slots ``-inf``, at least one finite
    per row; returns float32 of the same shape."""
    base2 = logits * LOG2E
    peak = base2.amax(dim=-1, keepdim=True)
    log2_total = torch.exp2(base2 - peak).sum(dim=-1, keepdim=True).log2()
    return base2.to(stored_dtype).float() - peak - log2_total


def slot_weights(
    logits: torch.Tensor,
    value_norm: torch.Tensor,
    score_kind: int,
    shared: bool,
    stored_dtype: torch.dtype = STORED_LOGIT_DTYPE,
) -> torch.Tensor:
    """This step's eviction weight of every slot, from ``logits`` ``[B, Hkv, G, S]`` (float32, natural
    log, masked slots ``-inf``) and ``value_norm`` ``[B, Hkv, S]``: the log-contribution (natural log;
    `ScoreKind.CONTRIBUTION`) or the summed softmax weight (`ScoreKind.ATTENTION`), over the group's
    query heads, and over the KV heads too when ``shared``. Returns ``[B, 1 or Hkv, S]`` float32.
    (`ScoreKind.POSITION` ranks positions and uses none.)"""
    log2_probs = stored_log2_probs(logits, stored_dtype)
    if score_kind == ScoreKind.CONTRIBUTION:
        log_contribution = log2_probs * LN2 + value_norm.log()[:, :, None]
        weight = log_contribution.logsumexp(dim=(1, 2) if shared else 2)
        return weight[:, None] if shared else weight
    weight = torch.exp2(log2_probs).sum(dim=2)
    return weight.sum(dim=1, keepdim=True) if shared else weight


def prepare_new_token(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """A new token's query or key rows ``x`` ``[B, H, D]`` (model dtype) after transformers' RMSNorm
    (with ``norm_weight`` ``[D]``; none when None) and RoPE (``cos``, ``sin`` ``[B, D]``).

    Rounded as compiled transformers rounds it (inductor keeps what eager rounds between elementwise
    operations in float32): the norm in float32, rounded to the model dtype, times the weight and
    rounded again (transformers' explicit casts), then the rotation in float32, rounded once. For a
    float32 model that is eager transformers' result bit for bit."""
    dtype = x.dtype
    if norm_weight is not None:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        x = (norm_weight.float() * normed.float()).to(dtype)
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos.float()[:, None] + rotated * sin.float()[:, None]).to(dtype)


def reallocate_one_slot(
    rank: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    value_norm: torch.Tensor,
    slot_pos: torch.Tensor,
    write_slot: torch.Tensor,
    slot_limit: torch.Tensor,
    due: torch.Tensor,
    min_limit: int,
) -> None:
    """ReasonAlloc's online step: in every ``due`` row, move one live slot from one KV head (the
    donor) to another (the recipient), when that gains more than it loses.

    ``rank`` ``[B, Hkv, S]`` is this step's eviction rank of every slot (`rank_slots`: lower goes
    first) and ``write_slot`` ``[B, Hkv]`` already holds each head's cheapest slot, the one its next
    token overwrites. A head that gives up a slot also loses its second-cheapest token, so the
    donor is the head whose second-cheapest ranks lowest; a head that gains a slot keeps its
    cheapest, so the recipient is the head whose cheapest ranks highest. The move is made when
    the recipient's cheapest outranks the donor's second-cheapest, the donor keeps at least
    ``min_limit`` slots and the recipient at most ``S``. Ties go to the lower head, and among
    equal ranks to the lower slot. ``due`` ``[B]`` bool.

    The donor's last live slot leaves its range: the token there moves into the slot of the
    second-cheapest (or, when the last slot holds the cheapest, the cheapest goes now and the
    second-cheapest becomes the next write). The recipient's first slot past its old limit
    (empty: slots past a head's limit always are) becomes its next write, so it evicts nothing.
    Mutates ``k_cache``, ``v_cache``, ``value_norm``, ``slot_pos``, ``write_slot``, ``slot_limit``.
    """
    slots = rank.shape[-1]
    ranked, order = rank.sort(dim=-1, stable=True)
    loss = ranked[..., 1].masked_fill(slot_limit - 1 < min_limit, torch.inf)
    gain = ranked[..., 0].masked_fill(slot_limit + 1 > slots, -torch.inf)
    donor, recipient = loss.argmin(dim=-1), gain.argmax(dim=-1)
    rows = torch.arange(rank.shape[0], device=rank.device)
    moves = due & (donor != recipient) & (gain[rows, recipient] > loss[rows, donor])
    rows, donor, recipient = rows[moves], donor[moves], recipient[moves]

    last = slot_limit[rows, donor].long() - 1
    cheapest, second = write_slot[rows, donor].long(), order[rows, donor, 1]
    vacated = torch.where(cheapest == last, cheapest, second)  # the token that goes now
    for buffer in (k_cache, v_cache, value_norm, slot_pos):
        buffer[rows, donor, vacated] = buffer[rows, donor, last]
    slot_pos[rows, donor, last] = -1
    write_slot[rows, donor] = torch.where(cheapest == last, second, cheapest).to(write_slot.dtype)
    slot_limit[rows, donor] -= 1
    write_slot[rows, recipient] = slot_limit[rows, recipient]
    slot_limit[rows, recipient] += 1


def decode_attention_reference(
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
    """Reference decode step; see the module docstring for shapes and semantics.
    ``planned_slots`` and ``overlap_scoring`` are the kernel's launch hints and have no effect here.
    ``reallocate_every`` (0: never) and ``min_limit``: online re-allocation between heads.
    ``cos``, ``sin``, ``q_norm_weight``, ``k_norm_weight``, ``norm_eps``: the new token's RoPE and
    norms (`prepare_new_token`), or None when ``q`` and ``k_new`` come rotated."""
    check_reallocation(reallocate_every, shared, accumulated)
    check_new_token_preparation(q, cos, sin, q_norm_weight, k_norm_weight)
    if cos is not None:
        q = prepare_new_token(q, cos, sin, q_norm_weight, norm_eps)
        k_new = prepare_new_token(k_new, cos, sin, k_norm_weight, norm_eps)
    batch, kv_heads, slots, head_dim = k_cache.shape
    group = q.shape[1] // kv_heads
    rows = torch.arange(batch, device=q.device)[:, None]
    heads = torch.arange(kv_heads, device=q.device)[None, :]
    current = write_slot.long()

    k_cache[rows, heads, current] = k_new
    v_cache[rows, heads, current] = v_new
    value_norm[rows, heads, current] = v_new.float().abs().sum(dim=-1)
    slot_pos[rows, heads, current] = position.to(slot_pos.dtype)[:, None]

    usable = torch.arange(slots, device=q.device) < slot_limit[..., None]
    valid = usable & (slot_pos >= 0)
    logits = torch.einsum("bhgd,bhsd->bhgs", q.float().view(batch, kv_heads, group, head_dim), k_cache.float())
    logits = (logits * scale).masked_fill(~valid[:, :, None, :], -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgs,bhsd->bhgd", probs, v_cache.float()).reshape(batch, kv_heads * group, head_dim)

    select = slice(0, 1) if shared else slice(None)
    weight = slot_weights(logits, value_norm, score_kind, shared)
    if accumulated is not None and score_kind == ScoreKind.ATTENTION:
        previous = accumulated.scatter(-1, current[:, select, None], 0.0)
        weight = weight + previous
        accumulated.copy_(weight)
    score = slot_pos[:, select].float() if score_kind == ScoreKind.POSITION else weight
    rank = rank_slots(score, slot_pos[:, select], usable[:, select], position, sink_tokens, recent_window)
    write_slot.copy_(rank.argmin(dim=-1).to(write_slot.dtype).expand(batch, kv_heads))
    if reallocate_every:
        due = position % reallocate_every == 0
        reallocate_one_slot(rank, k_cache, v_cache, value_norm, slot_pos, write_slot, slot_limit, due, min_limit)
    return out.to(q.dtype)


def check_reallocation(reallocate_every: int, shared: bool, accumulated: torch.Tensor | None) -> None:
    """Online re-allocation moves slots between heads that evict on their own, by one step's ranks."""
    if reallocate_every < 0:
        raise ValueError(f"reallocate_every must be >= 0 (0: never), got {reallocate_every}")
    if reallocate_every and (shared or accumulated is not None):
        raise ValueError("online re-allocation needs per-head eviction without accumulated scores")


def check_new_token_preparation(
    q: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
) -> None:
    """The new token's RoPE needs ``cos`` and ``sin`` ``[B, D]`` together, and its norms both weights ``[D]``
    and the rotation (Qwen3 normalises, then rotates)."""
    batch, _, head_dim = q.shape
    if (cos is None) != (sin is None):
        raise ValueError("the new token's RoPE needs both cos and sin")
    if (q_norm_weight is None) != (k_norm_weight is None) or (q_norm_weight is not None and cos is None):
        raise ValueError("the new token's q/k norms need both weights and cos / sin")
    for name, table in (("cos", cos), ("sin", sin)):
        if table is not None and (table.shape != (batch, head_dim) or table.stride(-1) != 1):
            raise ValueError(f"{name} must be [B, D] = {[batch, head_dim]} with a contiguous last dim, "
                             f"got {list(table.shape)} strides {table.stride()}")  # fmt: skip
    for name, weight in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if weight is not None and (weight.shape != (head_dim,) or not weight.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [D] = [{head_dim}], got {list(weight.shape)}")
