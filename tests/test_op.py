"""The registered custom op: schema, fake implementation and declared mutations (opcheck)."""

import pytest
import torch

import longflow_patch  # noqa: F401  (registers torch.ops.longflow)

from test_decode_kernel import random_step, reallocating_step


def test_op_is_registered_in_longflow_namespace():
    assert hasattr(torch.ops.longflow, "decode_attention")


def test_opcheck_passes_for_shared_and_per_head_and_accumulating_calls():
    for shared, accumulate, score in ((True, False, 0), (False, False, 0), (True, True, 1)):
        step = random_step(2, 2, 4, 40, 32, torch.float32, 30, shared=shared, accumulate=accumulate)
        step = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in step.items()}
        args = (*step.values(), 32**-0.5, 4, 8, shared, score)
        torch.library.opcheck(torch.ops.longflow.decode_attention.default, args)


def test_opcheck_passes_for_online_reallocation_which_mutates_limits():
    step = reallocating_step(3, 4, 2, 40, 32, torch.float32, 40, every=2)
    step = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in step.items()}
    args = (*step.values(), 32**-0.5, 2, 4, False, 0, 0, 2, 7)
    torch.library.opcheck(torch.ops.longflow.decode_attention.default, args)


def test_online_reallocation_refuses_shared_eviction_and_accumulated_scores():
    for shared, accumulate in ((True, False), (False, True)):
        step = random_step(1, 2, 2, 24, 32, torch.float32, 24, shared=shared, accumulate=accumulate)
        step = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in step.items()}
        with pytest.raises(ValueError, match="per-head eviction without accumulated scores"):
            torch.ops.longflow.decode_attention(*step.values(), 0.2, 2, 4, shared, 1, 0, 1, 7)


def test_op_traces_into_one_graph_without_breaks():
    step = random_step(1, 2, 4, 24, 32, torch.float32, 24)
    tensors = [v.cpu() for v in step.values() if v is not None]

    def one_step(*tensors):
        return torch.ops.longflow.decode_attention(*tensors, None, 0.2, 4, 8, True, 0)

    explanation = torch._dynamo.explain(one_step)(*tensors)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
