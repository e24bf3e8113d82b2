"""The fused Triton decode step against its PyTorch reference, on fresh random inputs.

On a CPU machine the kernel runs in Triton's interpreter; on a GPU, natively (larger shapes too).
"""

import math

import pytest
import torch

from longflow_patch.kernels.decode_attention import (
    AttendLaunch,
    ScoreLaunch,
    decode_attention_triton,
    multiprocessor_count,
    plan_decode,
    plan_splits,
)
from longflow_patch.kernels.decode_attention_reference import (
    LOG2E,
    STORED_LOGIT_DTYPE,
    ScoreKind,
    decode_attention_reference,
    slot_weights,
)

from triton_interpreter import INTERPRETED

DEVICE = "cpu" if INTERPRETED else "cuda"


def random_step(batch, kv_heads, group, slots, head_dim, dtype, filled, ragged=False, shared=True, accumulate=False):
    """Arguments of one decode step over a cache whose first ``filled`` slots hold tokens."""

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    positions = torch.stack([torch.randperm(4 * slots, device=DEVICE)[:slots] for _ in range(batch)])
    slot_pos = positions[:, None, :].repeat(1, kv_heads, 1).to(torch.int32)
    if not shared:  # per-head eviction: every head holds different tokens
        slot_pos = torch.stack([torch.randperm(4 * slots, device=DEVICE)[:slots] for _ in range(batch * kv_heads)])
        slot_pos = slot_pos.view(batch, kv_heads, slots).to(torch.int32)
    slot_pos[..., filled:] = -1
    slot_pos[0, :, : min(2, filled)] = -1  # padding in the middle of row 0
    limit = torch.full((batch, kv_heads), slots, dtype=torch.int32, device=DEVICE)
    if ragged:  # shared eviction needs one limit for all heads of a row
        limit = (
            torch.randint(slots // 2, slots + 1, (batch, 1 if shared else kv_heads), dtype=torch.int32, device=DEVICE)
            .expand(batch, kv_heads)
            .contiguous()
        )
    write = torch.minimum(torch.full_like(limit, filled), limit - 1)
    if shared:
        write = write[:, :1].expand(batch, kv_heads).contiguous()
    accumulated = torch.rand(batch, 1 if shared else kv_heads, slots, device=DEVICE) if accumulate else None
    v_cache = rand(batch, kv_heads, slots, head_dim)
    return dict(
        q=rand(batch, kv_heads * group, head_dim),
        k_new=rand(batch, kv_heads, head_dim),
        v_new=rand(batch, kv_heads, head_dim),
        k_cache=rand(batch, kv_heads, slots, head_dim),
        v_cache=v_cache,
        value_norm=v_cache.float().abs().sum(dim=-1),
        slot_pos=slot_pos,
        write_slot=write,
        position=torch.full((batch,), 4 * slots, dtype=torch.int32, device=DEVICE),
        slot_limit=limit,
        accumulated=accumulated,
    )


def same_layout_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` with its strides (``clone`` makes a strided view contiguous)."""
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def softmax_scale(step: dict) -> float:
    """The attention scale `run_both` gives both implementations: ``head_dim ** -0.5``."""
    return step["q"].shape[-1] ** -0.5


def run_both(
    step, score_kind, shared, n_splits=None, sink=4, recent=8, planned_slots=0, reallocate_every=0, launch=None
):
    theirs = {k: same_layout_copy(v) if isinstance(v, torch.Tensor) else v for k, v in step.items()}
    settings = dict(
        scale=softmax_scale(step),
        sink_tokens=sink,
        recent_window=recent,
        shared=shared,
        score_kind=int(score_kind),
        reallocate_every=reallocate_every,
        min_limit=sink + recent + 1,
    )
    expected = decode_attention_reference(**step, **settings)
    got = decode_attention_triton(**theirs, **settings, planned_slots=planned_slots, n_splits=n_splits, launch=launch)
    return step, expected, theirs, got


def assert_same_step(step, expected, theirs, got):
    assert not torch.isnan(got).any(), "kernel left unwritten or NaN outputs"
    error = (got.float() - expected.float()).norm() / expected.float().norm()
    assert error < 1.5e-2, f"relative output error {error:.2e}"
    for name in ("k_cache", "v_cache", "slot_pos", "slot_limit"):
        assert torch.equal(step[name], theirs[name]), f"{name} differs after the write"
    assert torch.equal(step["write_slot"], theirs["write_slot"]), (step["write_slot"], theirs["write_slot"])
    torch.testing.assert_close(theirs["value_norm"], step["value_norm"], rtol=1e-5, atol=1e-5)
    if step["accumulated"] is not None:
        assert_accumulated_close(step, theirs)


def assert_accumulated_close(step, theirs):
    """H2O's accumulated weights after one step, kernel (``theirs``) against reference (``step``).

    Both add softmax weights of base-2 logits rounded to `STORED_LOGIT_DTYPE`. Their float32 logits
    differ in the last bits, so a logit next to a rounding boundary may round one fp16 spacing apart
    in the two, which scales its weight by up to ``2 ** spacing``: the tolerance is that factor at the
    step's largest logit (the accumulated scores start nonnegative, so it bounds the sums too)."""
    q = step["q"].float().unflatten(1, (step["k_cache"].shape[1], -1))
    logits = torch.einsum("bhgd,bhsd->bhgs", q, step["k_cache"].float()) * softmax_scale(step)
    largest = logits.abs().amax() * LOG2E
    spacing = torch.finfo(STORED_LOGIT_DTYPE).eps * 2 ** largest.log2().floor().item()
    rtol = 2**spacing - 1 + 1e-4
    torch.testing.assert_close(theirs["accumulated"], step["accumulated"], rtol=rtol, atol=1e-6)


CASES = [
    # batch, kv_heads, group, slots, head_dim, dtype, filled, shared, score, n_splits, ragged, accumulate
    (2, 2, 4, 300, 64, torch.bfloat16, 300, True, ScoreKind.CONTRIBUTION, 3, False, False),
    (1, 2, 4, 130, 128, torch.float16, 100, True, ScoreKind.CONTRIBUTION, 2, False, False),
    (3, 2, 2, 96, 64, torch.bfloat16, 96, False, ScoreKind.CONTRIBUTION, 1, False, False),
    (2, 1, 8, 200, 64, torch.float16, 200, False, ScoreKind.ATTENTION, 2, False, True),
    (2, 4, 1, 64, 64, torch.bfloat16, 64, True, ScoreKind.ATTENTION, 1, False, True),
    (1, 2, 1, 100, 64, torch.float16, 100, True, ScoreKind.POSITION, 1, False, False),
    (2, 2, 4, 160, 64, torch.bfloat16, 160, False, ScoreKind.CONTRIBUTION, 2, True, False),
    (1, 1, 4, 16, 64, torch.bfloat16, 16, True, ScoreKind.CONTRIBUTION, 1, False, False),
    (2, 2, 16, 70, 32, torch.float16, 40, True, ScoreKind.CONTRIBUTION, 1, False, False),
    # the output programs merge 32-column slices: one narrower slice (16), eight slices (256)
    (2, 1, 4, 40, 16, torch.float16, 30, True, ScoreKind.ATTENTION, 2, False, False),
    (1, 2, 2, 48, 256, torch.bfloat16, 48, False, ScoreKind.CONTRIBUTION, 2, True, False),
]
if not INTERPRETED:
    CASES += [
        (8, 8, 4, 4096, 128, torch.bfloat16, 4096, True, ScoreKind.CONTRIBUTION, None, False, False),
        (1, 8, 4, 16384, 128, torch.bfloat16, 16384, False, ScoreKind.CONTRIBUTION, None, False, False),
        (32, 8, 4, 1024, 128, torch.float16, 1000, True, ScoreKind.ATTENTION, None, True, True),
        (4, 4, 8, 2048, 64, torch.bfloat16, 2048, False, ScoreKind.CONTRIBUTION, None, True, False),
        # a throughput row's shape: a budget off any multiple of 16, one split per head
        (64, 8, 4, 1740, 128, torch.bfloat16, 1740, True, ScoreKind.CONTRIBUTION, None, False, False),
    ]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "b{}-hkv{}-g{}-s{}-d{}-{}-fill{}-{}-{}-split{}-{}-{}".format(
        *c[:5], str(c[5]).split(".")[-1], c[6], "shared" if c[7] else "perhead", c[8].name, *c[9:]
    ),
)
def test_kernel_matches_reference(case):
    batch, kv_heads, group, slots, head_dim, dtype, filled, shared, score, n_splits, ragged, accumulate = case
    step = random_step(batch, kv_heads, group, slots, head_dim, dtype, filled, ragged, shared, accumulate)
    assert_same_step(*run_both(step, score, shared, n_splits))


@pytest.mark.parametrize(
    "batch,kv_heads,group,slots,n_splits",
    [(2, 2, 4, 200, 2), (3, 1, 8, 64, 1)] + ([] if INTERPRETED else [(64, 8, 4, 1740, None)]),
)
def test_new_token_read_through_row_strides(batch, kv_heads, group, slots, n_splits):
    """The new token's query, key and value as slices of one row of a fused q/k/v projection's
    output (``[B, (Hq + 2 Hkv) * D]``), the way the cache passes them, not copied: same step."""
    head_dim = 64
    step = random_step(batch, kv_heads, group, slots, head_dim, torch.bfloat16, slots)
    names = ("q", "k_new", "v_new")
    fused = torch.cat([step[name].flatten(1) for name in names], dim=1)
    widths = [step[name].shape[1] * head_dim for name in names]
    for name, part in zip(names, fused.split(widths, dim=1), strict=True):
        step[name] = part.view(batch, -1, head_dim)
    assert not step["v_new"].is_contiguous() and step["v_new"].stride(0) == fused.shape[1]
    step, expected, theirs, got = run_both(step, ScoreKind.CONTRIBUTION, True, n_splits)
    assert theirs["v_new"].stride() == step["v_new"].stride()
    assert_same_step(step, expected, theirs, got)


def rope_step(step: dict, normed: bool, per_row: bool) -> dict:
    """The new token's RoPE tables (``[B, D]``: one row broadcast over the batch, or a slice of
    ``[B, n, D]`` tables as the cache passes them) and, ``normed``, Qwen3's q/k norm weights."""
    batch, head_dim, dtype = step["q"].shape[0], step["q"].shape[-1], step["q"].dtype
    positions = torch.randint(0, 40_000, (batch if per_row else 1, 3, 1), device=DEVICE).float()
    inv_freq = 1.0 / (1_000_000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    angles = torch.cat([positions * inv_freq] * 2, dim=-1)
    cos, sin = (table[:, 1].to(dtype).expand(batch, -1) for table in (angles.cos(), angles.sin()))
    weights = [torch.rand(head_dim, device=DEVICE).to(dtype) + 0.5 if normed else None for _ in range(2)]
    return dict(cos=cos, sin=sin, q_norm_weight=weights[0], k_norm_weight=weights[1], norm_eps=1e-6 if normed else 0.0)


@pytest.mark.parametrize("normed", [True, False], ids=["qwen3", "rope-only"])
@pytest.mark.parametrize(
    "batch,kv_heads,group,slots,head_dim,dtype,n_splits,per_row",
    [(2, 2, 4, 200, 64, torch.bfloat16, 2, True), (3, 1, 8, 64, 128, torch.float16, 1, False)]
    + ([] if INTERPRETED else [(64, 8, 4, 1740, 128, torch.bfloat16, None, True)]),
)
def test_new_token_normalised_and_rotated_like_reference(batch, kv_heads, group, slots, head_dim, dtype, n_splits,
                                                         per_row, normed):  # fmt: skip
    """Given RoPE tables (and norm weights), the attention pass normalises and rotates the new query
    and key as it loads them: same output and choice as the reference, and the same key cached to
    one rounding (the two sum the squares in different orders; Triton's interpreter truncates
    float32 to bfloat16 where the GPU and torch round to nearest)."""
    step = random_step(batch, kv_heads, group, slots, head_dim, dtype, slots - 3, shared=True)
    preparation = rope_step(step, normed, per_row)
    theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in step.items()}
    settings = dict(scale=head_dim**-0.5, sink_tokens=4, recent_window=8, shared=True, score_kind=0)
    expected = decode_attention_reference(**step, **settings, **preparation)
    got = decode_attention_triton(**theirs, **settings, **preparation, n_splits=n_splits)
    error = (got.float() - expected.float()).norm() / expected.float().norm()
    assert error < (2.5e-2 if INTERPRETED and dtype == torch.bfloat16 else 1.5e-2), f"relative output error {error:.2e}"
    assert torch.equal(step["write_slot"], theirs["write_slot"]) and torch.equal(step["slot_pos"], theirs["slot_pos"])
    written = torch.zeros_like(step["slot_pos"], dtype=torch.bool)
    written.scatter_(-1, random_step_write_slots(batch, kv_heads, slots), True)
    assert torch.equal(step["k_cache"][~written], theirs["k_cache"][~written])
    # Up to one rounding in each of the norm, its weight and the rotation, of values up to the row's
    # largest (a rotated column sums two terms); each a truncation in the interpreter's bfloat16.
    rounding = torch.finfo(dtype).eps * (4 if INTERPRETED and dtype == torch.bfloat16 else 2)
    expected_keys = step["k_cache"][written]
    torch.testing.assert_close(theirs["k_cache"][written], expected_keys, rtol=0,
                               atol=rounding * expected_keys.abs().amax().item())  # fmt: skip
    unrotated = step["k_new"].reshape(-1, head_dim)
    assert not torch.allclose(theirs["k_cache"][written].float(), unrotated.float(), atol=1e-2), "key cached unrotated"


def random_step_write_slots(batch: int, kv_heads: int, slots: int) -> torch.Tensor:
    """``[B, Hkv, 1]``: the slot a `random_step` with ``slots - 3`` filled slots writes."""
    return torch.full((batch, kv_heads, 1), slots - 3, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize(
    "launch",
    [
        AttendLaunch(32, 4, 2),
        AttendLaunch(64, 8, 3),
        AttendLaunch(128, 8, 4),
        AttendLaunch(64, 4, 2, max_registers=128),
        AttendLaunch(32, 4, 3, max_registers=128),
    ],
    ids=lambda launch: (
        f"block{launch.block_s}-warps{launch.num_warps}-stages{launch.num_stages}"
        + (f"-registers{launch.max_registers}" if launch.max_registers else "")
    ),
)
@pytest.mark.parametrize("n_splits", [1, 3])
def test_attention_launch_shapes_match_reference(launch, n_splits):
    """The attention pass's launch shapes that `bench/decode_op.py --sweep` times compute the same
    step: tiles of 32-128 slots (a budget off their multiples), 4 or 8 warps, 2-4 stages, registers capped."""
    step = random_step(2, 2, 4, 300 if INTERPRETED else 1740, 128, torch.bfloat16, 280, shared=True)
    assert_same_step(*run_both(step, ScoreKind.CONTRIBUTION, True, n_splits, launch=launch))


@pytest.mark.parametrize("score", [ScoreKind.CONTRIBUTION, ScoreKind.ATTENTION])
def test_ragged_budgets_planned_for_the_mean_match_reference(score):
    """Splits and score chunks sized for the mean live budget (as the cache plans ragged layers):
    heads above the mean span more programs, programs past a head's limit exit empty."""
    step = random_step(2, 4, 4, 600, 64, torch.bfloat16, 600, ragged=True, shared=False, accumulate=True)
    planned = math.ceil(step["slot_limit"].float().mean().item())
    if not INTERPRETED:  # the GPU plans for its own SM count; force several splits per head there too
        planned = min(planned, 256)
    assert_same_step(*run_both(step, score, False, planned_slots=planned))


def chained_steps(step: dict, settings: dict, count: int, **kernel_options):
    """Run ``count`` decode steps on one cache with both implementations, fresh query and token
    each step; yields the step index, the reference's arguments and the kernel's after each
    (``kernel_options``: more arguments of the kernel's launcher)."""
    theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in step.items()}
    for index in range(count):
        new = dict(
            q=torch.randn_like(step["q"]),
            k_new=torch.randn_like(step["k_new"]),
            v_new=torch.randn_like(step["v_new"]),
            position=step["position"] + index + 1,
        )
        step.update(new)
        theirs.update({k: v.clone() for k, v in new.items()})
        decode_attention_reference(**step, **settings)
        decode_attention_triton(**theirs, **settings, **kernel_options)
        yield index, step, theirs


def test_kernel_over_many_steps_keeps_choosing_like_reference():
    """Chain 40 steps on one cache: both implementations must evict the same slots every step."""
    step = random_step(2, 2, 4, 48, 64, torch.bfloat16, 20, shared=False)
    settings = dict(scale=0.125, sink_tokens=2, recent_window=4, shared=False, score_kind=0)
    for index, ours, theirs in chained_steps(step, settings, 40):
        assert torch.equal(ours["write_slot"], theirs["write_slot"]), f"step {index}"
        assert torch.equal(ours["slot_pos"], theirs["slot_pos"]), f"step {index}"


# Score tiles of 16 slots, either one tile a chunk (many chunks per scope) or several (few chunks:
# a tile cap of 64 logits over 4-8 query heads, and one or two programs per SM). The chunk plan
# follows the SM count, so a GPU gets enough slots for several tiles per chunk at one program per SM.
ONE_TILE_CHUNKS = ScoreLaunch(16)
MULTI_TILE_CHUNKS = ScoreLaunch(tile_logits=64, programs_per_sm=2 if INTERPRETED else 1)
MANY_CHUNK_SLOTS = 300 if INTERPRETED else 64 * multiprocessor_count(torch.device(DEVICE))


@pytest.mark.parametrize(
    "score,shared,score_launch",
    [
        pytest.param(score, shared, launch, id=f"{score.name}-{'shared' if shared else 'perhead'}-{name}")
        for score, launch, name in [(kind, ONE_TILE_CHUNKS, "one-tile") for kind in ScoreKind]
        + [(ScoreKind.CONTRIBUTION, MULTI_TILE_CHUNKS, "multi-tile")]
        for shared in (True, False)
    ],
)
def test_many_score_chunks_choose_like_reference_step_after_step(score, shared, score_launch):
    """Several chunks per selection scope fold their choices into one cell, in any order, and the
    last to arrive writes the slot. Over chained steps with kept scratch, whose cells are scribbled
    over between steps (the attention pass must empty them), the slots match the reference's,
    including ties across chunks: empty slots at both ends (the earliest goes first)."""
    slots = MANY_CHUNK_SLOTS
    step = random_step(
        2, 2, 4, slots, 64, torch.bfloat16, slots - 40, shared=shared, accumulate=score == ScoreKind.ATTENTION
    )
    settings = dict(scale=0.125, sink_tokens=4, recent_window=8, shared=shared, score_kind=int(score))
    workspaces = {}
    for index, ours, theirs in chained_steps(step, settings, 12, score_launch=score_launch, workspaces=workspaces):
        assert torch.equal(ours["write_slot"], theirs["write_slot"]), f"step {index}"
        assert torch.equal(ours["slot_pos"], theirs["slot_pos"]), f"step {index}"
        (launches,) = workspaces.values()
        # Arrivals that never reach the last chunk's count, and a choice better than any real one.
        launches.work.choice[..., 0] = 1000 + index
        launches.work.choice[..., 1] = 2**62 + index
    ((plan, *_),) = workspaces
    assert plan.score_block == 16
    if score_launch is ONE_TILE_CHUNKS:
        assert plan.n_chunks >= 8
    else:
        assert plan.n_chunks >= 2 and plan.chunk_size >= 5 * plan.score_block


def test_empty_slots_fill_before_any_eviction_and_protection_holds():
    step = random_step(1, 1, 4, 64, 64, torch.float16, 64)
    step["slot_pos"][0, 0] = torch.randperm(256, device=DEVICE)[:64].to(torch.int32) + 16
    step["slot_pos"][..., 10:20] = -1
    step["write_slot"].fill_(10)
    # Slot 3, below the empty ones, holds an unprotected token whose value is exactly zero
    # (log-contribution -inf): it must not tie with the empty slots and win on index.
    step["slot_pos"][0, 0, 3] = 100
    step["v_cache"][0, 0, 3] = 0.0
    step["value_norm"][0, 0, 3] = 0.0
    step, _, theirs, _ = run_both(step, ScoreKind.CONTRIBUTION, True)
    assert step["write_slot"].item() == theirs["write_slot"].item() == 11  # the lowest empty slot still goes first
    step = random_step(1, 1, 4, 64, 64, torch.float16, 64)
    step["slot_pos"][0, 0] = torch.arange(64, dtype=torch.int32, device=DEVICE)  # positions 0..63
    step["position"].fill_(64)
    step["write_slot"].fill_(5)  # position 5 is overwritten by position 64
    _, _, theirs, _ = run_both(step, ScoreKind.POSITION, True, sink=4, recent=8)
    assert theirs["write_slot"].item() == 4  # oldest non-sink token: position 4


@pytest.mark.parametrize("score", [ScoreKind.CONTRIBUTION, ScoreKind.ATTENTION])
def test_scores_rank_logits_rounded_to_fp16_like_the_reference(score):
    """Both implementations rank slots from base-2 logits stored in fp16 (`STORED_LOGIT_DTYPE`).
    Slot 0's logit is 2**-10 above slot 1's, under half an fp16 step at 14.4 (base 2): from float32
    logits slot 1 goes, from fp16 ones the two tie and the lower slot goes. A kernel that kept its
    logits in float32 would evict slot 1."""
    slots, head_dim = 16, 16
    step = random_step(1, 1, 1, slots, head_dim, torch.float16, slots)
    step["q"].zero_()[..., :2] = 1.0
    step["k_cache"].zero_()[0, 0, :, 0] = 16.0  # every other slot's logit is far higher
    step["k_cache"][0, 0, :2, 0] = 10.0
    step["k_cache"][0, 0, 0, 1] = 2.0**-10
    step["k_new"].zero_()[..., 0] = 17.0
    for values in (step["v_cache"], step["v_new"]):
        values.zero_()[..., 0] = 1.0
    step["value_norm"].fill_(1.0)
    step["slot_pos"][0, 0] = torch.arange(slots, dtype=torch.int32, device=DEVICE) + 10
    step["write_slot"].fill_(slots - 1)
    logits = torch.einsum("bhgd,bhsd->bhgs", step["q"].float()[:, None], step["k_cache"].float())
    logits[..., -1] = 17.0  # this step's token, written at the last slot
    fp32_weights = slot_weights(logits, step["value_norm"], score, shared=True, stored_dtype=torch.float32)
    assert fp32_weights[0, 0, :2].argmin().item() == 1, "the case must tell float32 and fp16 apart"
    step, _, theirs, _ = run_both(step, score, True, sink=0, recent=0)
    assert step["write_slot"].item() == theirs["write_slot"].item() == 0


def test_attend_launch_waves_set_the_splits():
    """At the 8B 4k row (batch 64, 921 slots, 132 SMs) two waves want one program per KV head;
    ``waves`` asks for more programs (splits of whole tiles, covering every slot), up to one a tile
    (tiles of 128 slots here)."""
    shape = dict(batch=64, kv_heads=8, group=4, slots=921, head_dim=128, num_sms=132, shared=True)
    assert plan_decode(**shape).n_splits == 1
    for waves, splits in ((4, 2), (8, 3), (64, 8)):
        plan = plan_decode(**shape, launch=AttendLaunch(block_s=128, waves=waves))
        assert plan.n_splits == splits, waves
        assert plan.split_size % plan.block_s == 0 and plan.n_splits * plan.split_size >= shape["slots"]


def test_score_launch_sets_tile_and_chunks_and_refuses_what_no_tile_can_be():
    """``tile_logits`` caps the logits of a scoring tile (32 query heads share one with shared
    eviction) and ``programs_per_sm`` sets how many chunks cut a scope; the chunks always cover it."""
    shape = dict(batch=64, kv_heads=8, group=4, slots=1740, head_dim=128, num_sms=132, shared=True)
    default = plan_decode(**shape)
    assert (default.score_block, default.n_chunks, default.chunk_size) == (128, 14, 128)
    assert plan_decode(**shape, score_launch=ScoreLaunch(tile_logits=2048)).score_block == 64
    fewer = plan_decode(**shape, score_launch=ScoreLaunch(programs_per_sm=4))
    assert (fewer.n_chunks, fewer.chunk_size) == (7, 256)
    assert (fewer.n_chunks - 1) * fewer.chunk_size < shape["slots"] <= fewer.n_chunks * fewer.chunk_size
    for field in ("block", "tile_logits", "programs_per_sm"):
        with pytest.raises(ValueError, match=f"ScoreLaunch.{field} must be a power of two"):
            ScoreLaunch(**{field: 96})


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("slots", [100, 921, 1740, 6656])
def test_logit_rows_hold_every_scoring_tile(slots, shared):
    """The scoring pass loads whole tiles with no slot mask: the logits' row stride must cover the
    last tile of every chunk (all tiles start on a multiple of the tile), and be a multiple of 16
    floats, which Triton reads as "every row aligned"."""
    plan = plan_decode(8, 8, 4, slots, 128, 132, shared)
    last_tile_end = max(
        (s0 + plan.score_block for chunk in range(plan.n_chunks)
         for s0 in range(chunk * plan.chunk_size, min((chunk + 1) * plan.chunk_size, slots), plan.score_block)),
    )  # fmt: skip
    assert plan.logit_stride % 16 == 0 and plan.logit_stride % plan.score_block == 0
    assert slots <= last_tile_end <= plan.logit_stride < slots + plan.score_block


@pytest.mark.parametrize("score", [ScoreKind.CONTRIBUTION, ScoreKind.ATTENTION])
def test_logits_past_the_live_slots_never_reach_a_score(score):
    """The tile padding of the logits rows, and the slots past a ragged limit, are loaded but never
    written by the attention pass: NaN there must not reach a choice or the accumulated scores."""
    step = random_step(2, 2, 4, 100, 64, torch.bfloat16, 100, ragged=True, shared=False, accumulate=True)
    settings = dict(scale=0.125, sink_tokens=4, recent_window=8, shared=False, score_kind=int(score))
    workspaces = {}
    steps = chained_steps(step, settings, 3, score_launch=ScoreLaunch(64), workspaces=workspaces)
    for index, ours, theirs in steps:
        if index == 0:  # the scratch now exists: poison it before the next steps write their logits
            ((plan, *_),) = workspaces
            (launches,) = workspaces.values()
            assert plan.logit_stride == 128 > 100
            launches.work.logits.fill_(float("nan"))
            continue
        assert torch.equal(ours["write_slot"], theirs["write_slot"]), f"step {index}"
        torch.testing.assert_close(theirs["accumulated"], ours["accumulated"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch,kv_heads,slots", [(1, 8, 16384), (128, 8, 1024), (8, 2, 100)])
def test_split_plan_covers_cache(batch, kv_heads, slots):
    n_splits, split_size = plan_splits(batch, kv_heads, slots, 64, 132)
    assert split_size % 64 == 0
    assert (n_splits - 1) * split_size < slots <= n_splits * split_size


@pytest.mark.parametrize("batch,budget", [(1, 512), (1, 8192), (8, 2048), (128, 8192)])
def test_ragged_split_plan_is_no_longer_than_uniform(batch, budget):
    """Planned for the mean live budget, a ragged layout's splits hold no more slots than the
    uniform layout's, and together they still cover every physical slot."""
    physical = budget * 3 // 2
    _, uniform_size = plan_splits(batch, 8, budget, 128, 132, 1)
    n_splits, split_size = plan_splits(batch, 8, physical, 128, 132, 1, planned_slots=budget)
    assert split_size <= uniform_size
    assert (n_splits - 1) * split_size < physical <= n_splits * split_size


def reallocating_step(batch, kv_heads, group, slots, head_dim, dtype, filled, every):
    """A per-head step with ragged limits (slots past a head's limit empty, as the cache keeps
    them), where rows alternate between due and not due for re-allocation every ``every``.

    In rows 2, 4, ... head 0's tokens are worth nothing (zero values) and the other heads have room
    for one more slot, so when those rows are due and full a move is certain, whatever the draw."""
    step = random_step(batch, kv_heads, group, slots, head_dim, dtype, filled, ragged=True, shared=False)
    step["v_cache"][2::2, 0] = 0
    step["value_norm"][2::2, 0] = 0
    step["slot_limit"][2::2, 1:].clamp_(max=slots - 1)
    step["write_slot"] = torch.minimum(step["write_slot"], step["slot_limit"] - 1)
    beyond = torch.arange(slots, device=DEVICE) >= step["slot_limit"][..., None]
    step["slot_pos"].masked_fill_(beyond, -1)
    step["position"] = 4 * slots * every + torch.arange(batch, device=DEVICE, dtype=torch.int32) % 2
    return step


REALLOCATION_CASES = [
    # batch, kv_heads, group, slots, head_dim, dtype, filled, n_splits, planned
    (4, 4, 2, 96, 64, torch.bfloat16, 96, 2, False),
    (3, 2, 4, 200, 32, torch.float16, 200, 1, True),
    (2, 8, 1, 64, 64, torch.bfloat16, 60, 1, False),  # some heads still have empty slots
    (4, 3, 2, 700, 16, torch.bfloat16, 700, 3, True),  # several score chunks per head
]
if not INTERPRETED:
    REALLOCATION_CASES += [
        (8, 8, 4, 4096, 128, torch.bfloat16, 4096, None, True),
        (32, 8, 4, 1024, 128, torch.float16, 1024, None, True),
    ]


@pytest.mark.parametrize("case", REALLOCATION_CASES, ids=lambda c: "b{}-hkv{}-g{}-s{}-d{}".format(*c[:5]))
def test_online_reallocation_matches_reference(case):
    """Due rows move one slot between heads in both implementations alike (cache contents,
    limits and next write slots); the others only evict."""
    batch, kv_heads, group, slots, head_dim, dtype, filled, n_splits, planned = case
    step = reallocating_step(batch, kv_heads, group, slots, head_dim, dtype, filled, every=2)
    before = step["slot_limit"].clone()
    planned_slots = math.ceil(before.float().mean().item()) if planned else 0
    result = run_both(step, ScoreKind.CONTRIBUTION, False, n_splits, planned_slots=planned_slots, reallocate_every=2)
    assert_same_step(*result)
    after = step["slot_limit"]
    assert torch.equal(after.sum(dim=1), before.sum(dim=1)), "a row's total changed"
    assert torch.equal(after[1::2], before[1::2]), "a row that was not due re-allocated"
    if filled == slots:  # due rows past the first (which holds padding) have every head full
        assert (after[2::2] != before[2::2]).any(dim=1).all(), "a due row with full heads moved nothing"


def test_kernel_reallocating_over_many_steps_keeps_state_like_reference():
    """Chain 60 steps re-allocating every step: both implementations hold the same tokens, limits
    and next slots throughout, and limits end spread although they start even."""
    step = reallocating_step(2, 4, 2, 48, 32, torch.bfloat16, 20, every=1)
    step["slot_limit"].fill_(40)
    step["slot_pos"][..., 40:] = -1
    settings = dict(scale=0.2, sink_tokens=2, recent_window=4, shared=False, score_kind=0, reallocate_every=1,
                    min_limit=7)  # fmt: skip
    for index, ours, theirs in chained_steps(step, settings, 60):
        for name in ("write_slot", "slot_pos", "slot_limit", "k_cache"):
            assert torch.equal(ours[name], theirs[name]), f"{name} at step {index}"
        assert (ours["slot_limit"].sum(dim=1) == 160).all()
        assert (ours["slot_limit"] >= 7).all() and (ours["slot_limit"] <= 48).all()
    assert (step["slot_limit"] != 40).any(), "no slot ever moved"


def test_reallocation_moves_a_slot_from_the_cheapest_runner_up_to_the_dearest_cheapest():
    """Reference semantics on a hand-made rank table: the donor loses its second-cheapest token
    (its last slot's token takes that slot), the recipient's next token goes to a new slot."""
    from longflow_patch.kernels.decode_attention_reference import reallocate_one_slot

    inf = torch.inf
    rank = torch.tensor([[[5.0, 1.0, 9.0, 2.0, inf, inf],   # head 0: cheapest 1 (slot 1), runner-up 2 (slot 3)
                          [7.0, 8.0, 6.0, 9.0, 7.5, inf],   # head 1: cheapest 6 (slot 2): worth most
                          [3.0, 4.0, 3.5, inf, inf, inf]]])  # head 2: runner-up 3.5  # fmt: skip
    limit = torch.tensor([[4, 5, 3]], dtype=torch.int32)
    slot_pos = torch.tensor([[[10, 11, 12, 13, -1, -1], [20, 21, 22, 23, 24, -1], [30, 31, 32, -1, -1, -1]]],
                            dtype=torch.int32)  # fmt: skip
    keys = slot_pos[..., None].float().expand(1, 3, 6, 2).clone()
    values, norms = keys.clone(), slot_pos.float()
    write = rank.argmin(dim=-1).to(torch.int32)
    reallocate_one_slot(rank, keys, values, norms, slot_pos, write, limit, torch.tensor([True]), min_limit=2)
    assert limit.tolist() == [[3, 6, 3]]
    assert slot_pos[0, 0].tolist() == [10, 11, 12, -1, -1, -1]  # token 13 (runner-up) gone, slot 3 left the range
    assert write[0].tolist() == [1, 5, 0]  # donor still overwrites its cheapest; recipient fills its new slot
    # The donor's last slot held the cheapest: it goes now, the runner-up is written next.
    rank[0, 0] = torch.tensor([5.0, 2.0, 9.0, 1.0, inf, inf])
    limit, slot_pos = torch.tensor([[4, 5, 3]], dtype=torch.int32), slot_pos.clone()
    slot_pos[0, 0] = torch.tensor([10, 11, 12, 13, -1, -1])
    write = rank.argmin(dim=-1).to(torch.int32)
    reallocate_one_slot(rank, keys, values, norms, slot_pos, write, limit, torch.tensor([True]), min_limit=2)
    assert slot_pos[0, 0].tolist() == [10, 11, 12, -1, -1, -1] and write[0, 0] == 1
    # Not due, or the recipient's cheapest not above the donor's runner-up: nothing moves.
    limit = torch.tensor([[4, 5, 3]], dtype=torch.int32)
    reallocate_one_slot(rank, keys, values, norms, slot_pos, write, limit, torch.tensor([False]), min_limit=2)
    rank[0, 1, 2], rank[0, 2, 0] = 1.5, 1.2  # dearest cheapest 1.5 (head 1) < cheapest runner-up 2 (head 0)
    reallocate_one_slot(rank, keys, values, norms, slot_pos, write, limit, torch.tensor([True]), min_limit=2)
    assert limit.tolist() == [[4, 5, 3]]
