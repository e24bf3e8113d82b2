"""Verification attention: reference exactness, Triton kernel vs reference, the registered op."""

import pytest
import torch

import longflow_patch  # noqa: F401  (registers torch.ops.longflow)
from longflow_patch.kernels.verify_attention import verify_attention_triton
from longflow_patch.kernels.verify_attention_reference import (
    attention_with_lse,
    merge_attention_states,
    verify_attention_reference,
)

from triton_interpreter import INTERPRETED

DEVICE = "cpu" if INTERPRETED else "cuda"


def random_inputs(batch, kv_heads, group, slots, length, head_dim, dtype, ragged=True, device=DEVICE):
    """Arguments of one verification call (without mask and scale); row ``b`` holds a shorter prefix."""

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    prefix_len = torch.full((batch,), slots, dtype=torch.int32, device=device)
    if ragged:
        prefix_len -= torch.arange(batch, dtype=torch.int32, device=device) * (slots // (batch + 1))
    return (
        rand(batch, kv_heads * group, length, head_dim),
        rand(batch, kv_heads, slots, head_dim),
        rand(batch, kv_heads, slots, head_dim),
        prefix_len,
        rand(batch, kv_heads, length, head_dim),
        rand(batch, kv_heads, length, head_dim),
    )


def tree_mask(length: int, device=DEVICE) -> torch.Tensor:
    """A draft tree: token 0 is the root, the rest hang off it in two branches (odd / even)."""
    mask = torch.eye(length, dtype=torch.bool, device=device)
    mask[:, 0] = True
    for i in range(1, length):
        for j in range(1, i):
            mask[i, j] = (i - j) % 2 == 0
    return mask


def concatenated_attention(q, k_prefix, v_prefix, prefix_len, k_draft, v_draft, mask, scale):
    """Plain softmax attention over [valid prefix keys, draft keys] with the draft mask, per row."""
    batch, q_heads, length = q.shape[:3]
    group = q_heads // k_prefix.shape[1]
    outputs = []
    for row in range(batch):
        used = int(prefix_len[row])
        keys = torch.cat([k_prefix[row, :, :used], k_draft[row]], dim=1).repeat_interleave(group, dim=0).float()
        values = torch.cat([v_prefix[row, :, :used], v_draft[row]], dim=1).repeat_interleave(group, dim=0).float()
        visible = torch.cat([torch.ones(length, used, dtype=torch.bool, device=mask.device), mask], dim=1)
        logits = (q[row].float() @ keys.transpose(-1, -2) * scale).masked_fill(~visible, -torch.inf)
        outputs.append(torch.softmax(logits, dim=-1) @ values)
    return torch.stack(outputs)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "tree"])
def test_reference_equals_softmax_over_concatenated_keys(masked):
    args = random_inputs(3, 2, 4, 40, 5, 16, torch.float64, device="cpu")
    mask = tree_mask(5, "cpu") if masked else None
    got = verify_attention_reference(*args, mask, 0.25)
    expected = concatenated_attention(*args, tree_mask(5, "cpu") if masked else torch.ones(5, 5).tril().bool(), 0.25)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-6, atol=1e-6)


def test_merge_of_two_key_sets_equals_attention_over_their_union():
    q = torch.randn(2, 2, 3, 4, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 30, 16, dtype=torch.float64), torch.randn(2, 2, 30, 16, dtype=torch.float64)
    part = torch.rand(30) < 0.4
    everything = torch.ones(30, dtype=torch.bool)
    out_a, lse_a = attention_with_lse(q, k, v, part, 0.3)
    out_b, lse_b = attention_with_lse(q, k, v, ~part, 0.3)
    out_all, lse_all = attention_with_lse(q, k, v, everything, 0.3)
    merged, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(merged, out_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_all, rtol=1e-5, atol=1e-5)
    empty, empty_lse = attention_with_lse(q, k, v, torch.zeros(30, dtype=torch.bool), 0.3)
    alone, _ = merge_attention_states(empty, empty_lse, out_all, lse_all)  # a part with no key adds nothing
    torch.testing.assert_close(alone, out_all)


CASES = [
    # length, group, head_dim, dtype, n_splits, masked
    (1, 4, 32, torch.float16, None, False),
    (1, 4, 128, torch.bfloat16, 2, False),  # a decode step of the full-cache baseline (8B: G=4, D=128)
    (2, 1, 16, torch.bfloat16, 3, False),
    (3, 8, 64, torch.float16, 2, False),
    (4, 4, 128, torch.bfloat16, None, False),
    (5, 2, 32, torch.float16, 4, True),
    (8, 4, 32, torch.bfloat16, 3, False),
    (8, 8, 16, torch.float16, 1, True),
]


@pytest.mark.parametrize(("length", "group", "head_dim", "dtype", "n_splits", "masked"), CASES)
def test_triton_kernel_matches_reference(length, group, head_dim, dtype, n_splits, masked):
    args = random_inputs(2, 2, group, 150, length, head_dim, dtype)
    mask = tree_mask(length) if masked else None
    scale = head_dim**-0.5
    got = verify_attention_triton(*args, mask, scale, n_splits=n_splits)
    expected = verify_attention_reference(*(a.float() if a.is_floating_point() else a for a in args), mask, scale)
    assert got.dtype == dtype and got.shape == expected.shape
    error = (got.float() - expected).norm() / expected.norm()
    assert error < 1.5e-2, f"relative error {error:.2e}"


def test_op_passes_opcheck_with_causal_and_tree_masks():
    for mask in (None, tree_mask(4, "cpu")):
        args = random_inputs(2, 2, 2, 24, 4, 16, torch.float32, device="cpu")
        torch.library.opcheck(torch.ops.longflow.verify_attention.default, (*args, mask, 0.25))


def test_op_passes_opcheck_with_queries_in_the_attention_layout():
    """The attention passes ``q`` as a transpose of ``[B, T, Hq, D]``: the fake must give the strides
    the implementations return (contiguous), or inductor's stride checks fail in a compiled round."""
    q, *rest = random_inputs(2, 2, 2, 24, 4, 16, torch.float32, device="cpu")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.longflow.verify_attention.default, (q, *rest, None, 0.25))


def test_op_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    args = random_inputs(1, 2, 4, 32, 3, 16, torch.float32, device="cpu")

    def verify(*tensors):
        return torch.ops.longflow.verify_attention(*tensors, None, 0.25) * 2

    explanation = torch._dynamo.explain(verify)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(verify, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), verify(*args))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_visible_draft_keys_is_attention_over_the_prefix_alone(backend):
    """The GLIDE draft's cross-attention: queries over the target's cache, an all-False draft mask."""
    dtype = torch.float32 if backend == "reference" else torch.bfloat16
    args = random_inputs(2, 2, 4, 90, 3, 32, dtype)
    hidden = torch.zeros(3, 3, dtype=torch.bool, device=DEVICE)
    run = verify_attention_reference if backend == "reference" else verify_attention_triton
    got = run(*args, hidden, 32**-0.5).float()
    q, k_prefix, v_prefix, prefix_len = (a.float() if a.is_floating_point() else a for a in args[:4])
    empty = k_prefix[:, :, :0]
    expected = concatenated_attention(q, k_prefix, v_prefix, prefix_len, empty, empty, hidden[:, :0], 32**-0.5)
    error = (got - expected).norm() / expected.norm()
    assert error < (1e-5 if backend == "reference" else 1.5e-2), f"relative error {error:.2e}"
