"""The eager decode step: the Triton launcher called directly, with scratch buffers kept from
call to call, gives the registered op's step bit for bit, plans once per shape and launches
three kernels (four with online re-allocation); tracing still records the op."""

import pytest
import torch

import longflow_patch
from longflow_patch import ops
from longflow_patch.kernels import decode_attention as kernel

from models import left_padded_prompts, tiny_model
from test_decode_kernel import DEVICE, random_step, reallocating_step

CASES = {
    # name: (step arguments, settings)
    "shared": (lambda: random_step(2, 2, 4, 300, 64, torch.bfloat16, 200), dict(shared=True, score_kind=0)),
    "per-head accumulated": (
        lambda: random_step(2, 2, 2, 96, 64, torch.float16, 96, shared=False, accumulate=True),
        dict(shared=False, score_kind=1),
    ),
    "reallocating": (
        lambda: reallocating_step(4, 4, 2, 96, 64, torch.bfloat16, 96, every=1),
        dict(shared=False, score_kind=0, reallocate_every=1, min_limit=13),
    ),
}


def fresh_queries(step: dict, index: int) -> dict:
    generator = torch.Generator(device=DEVICE).manual_seed(index)

    def like(tensor):
        return torch.randn(tensor.shape, generator=generator, device=DEVICE).to(tensor.dtype)

    return dict(q=like(step["q"]), k_new=like(step["k_new"]), v_new=like(step["v_new"]),
                position=step["position"] + index + 1)  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_kept_scratch_gives_the_fresh_step_bit_for_bit_over_chained_steps(case):
    make, settings = CASES[case]
    fresh = make()
    kept = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in fresh.items()}
    settings = dict(scale=0.125, sink_tokens=4, recent_window=8, **settings)
    workspaces = {}
    for index in range(4):
        fresh.update(fresh_queries(fresh, index))
        kept.update(fresh_queries(kept, index))
        expected = kernel.decode_attention_triton(**fresh, **settings)
        got = kernel.decode_attention_triton(**kept, **settings, workspaces=workspaces)
        assert torch.equal(got, expected), f"step {index}: output differs"
        for name, tensor in fresh.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(kept[name], tensor), f"step {index}: {name} differs"
        (scratch,) = workspaces.values()  # one workspace for the one shape, kept from step to step
        if index == 0:
            first = scratch
        assert scratch is first


def counted(monkeypatch) -> list[str]:
    """Record each Triton launch of the decode step (by kernel name)."""
    launches = []

    class Counting:
        def __init__(self, name, function):
            self.name, self.function = name, function

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.function[grid]

    for name in ("_attend_split_kernel", "_score_chunk_kernel", "_combine_kernel", "_reallocate_kernel"):
        monkeypatch.setattr(kernel, name, Counting(name, getattr(kernel, name)))
    return launches


def test_eager_step_plans_once_allocates_only_its_output_and_launches_three_kernels(monkeypatch):
    launches = counted(monkeypatch)
    allocations = []
    allocate = kernel.DecodeWorkspace.allocate
    monkeypatch.setattr(kernel.DecodeWorkspace, "allocate", lambda *a: allocations.append(a) or allocate(*a))
    step = random_step(1, 2, 4, 200, 64, torch.bfloat16, 200)
    settings = dict(scale=0.125, sink_tokens=4, recent_window=8, shared=True, score_kind=0)
    kernel.plan_decode.cache_clear()
    workspaces = {}
    for index in range(3):
        step.update(fresh_queries(step, index))
        kernel.decode_attention_triton(**step, **settings, workspaces=workspaces)
    assert kernel.plan_decode.cache_info().misses == 1, "the launch plan is computed once per shape"
    assert len(allocations) == 1, "scratch buffers are allocated once, then kept"
    assert launches == ["_attend_split_kernel", "_score_chunk_kernel", "_combine_kernel"] * 3
    launches.clear()
    step = reallocating_step(2, 2, 2, 64, 64, torch.bfloat16, 64, every=1)
    kernel.decode_attention_triton(**step, scale=0.125, sink_tokens=2, recent_window=4, shared=False, score_kind=0,
                                   reallocate_every=1, min_limit=7, workspaces=workspaces)  # fmt: skip
    assert launches == ["_attend_split_kernel", "_score_chunk_kernel", "_combine_kernel", "_reallocate_kernel"]


def on_gpu_path(monkeypatch) -> list[str]:
    """Route CPU tensors the way CUDA tensors go (the launcher runs in Triton's interpreter; on a GPU
    the tensors are CUDA ones already), and record which route each step takes."""
    routes = []
    monkeypatch.setattr(ops, "runs_fused_kernel", lambda q: q.dtype in ops.KERNEL_DTYPES)
    launcher = kernel.decode_attention_triton
    monkeypatch.setattr(kernel, "decode_attention_triton", lambda *a, **k: routes.append("direct") or launcher(*a, **k))
    op = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a: routes.append("op") or op(*a))
    return routes


def test_decode_step_skips_the_op_dispatch_when_eager_and_records_the_op_when_traced(monkeypatch):
    step = random_step(1, 2, 4, 40, 32, torch.bfloat16, 30)
    args = (*step.values(), 32**-0.5, 4, 8, True, 0)
    expected = kernel.decode_attention_triton(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    routes = on_gpu_path(monkeypatch)
    got = ops.decode_step(*args, workspaces={})
    assert routes == ["direct"] and torch.equal(got, expected)

    routes.clear()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def one_step(*tensors):
        return ops.decode_step(*tensors, None, 32**-0.5, 4, 8, True, 0, workspaces={})

    torch.compile(one_step, backend=backend, fullgraph=True)(*tensors)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert any("longflow.decode_attention" in target for target in targets), targets
    assert "direct" not in routes


def test_patched_model_decodes_through_the_direct_path_and_matches_the_op(monkeypatch):
    """A bf16 model whose steps go straight to the launcher (as on a GPU) generates what the same
    kernel behind the registered op generates."""
    model = tiny_model("qwen3", "gqa", head_dim=32, dtype=torch.bfloat16).to(DEVICE)
    ids, mask = (tensor.to(DEVICE) for tensor in left_padded_prompts(batch=2, length=10))
    longflow_patch.apply(model, budget=16, compile=False)

    def generate():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                              do_sample=False, pad_token_id=0)  # fmt: skip

    with monkeypatch.context() as patched:
        patched.setattr(ops, "decode_attention", lambda *a: kernel.decode_attention_triton(*a))
        through_op = generate()
    routes = on_gpu_path(monkeypatch)
    assert torch.equal(generate(), through_op)
    assert set(routes) == {"direct"} and len(routes) == 11 * model.config.num_hidden_layers
