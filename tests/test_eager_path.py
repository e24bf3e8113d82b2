"""The eager decode step: the Triton launcher called directly, with scratch buffers kept from
call to call, gives the registered op's step bit for bit, plans once per shape and launches
two kernels (three with online re-allocation); tracing still records the op. With direct
launches on (``LONGFLOW_DIRECT_LAUNCH``), repeated steps on a GPU launch the compiled kernels
without Triton's JIT, with the same result bit for bit."""

import inspect
import os
import subprocess
import sys

import pytest
import torch

import longflow_patch
from longflow_patch import ops
from longflow_patch.kernels import decode_attention as kernel
from longflow_patch.kernels import launch

from models import left_padded_prompts, tiny_model
from test_decode_kernel import DEVICE, random_step, reallocating_step, same_layout_copy
from triton_interpreter import INTERPRETED

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


@pytest.mark.parametrize("direct", [False, True], ids=["jit", "direct"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kept_scratch_gives_the_fresh_step_bit_for_bit_over_chained_steps(case, direct, monkeypatch):
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", direct)
    jit_launches = counted(monkeypatch)
    make, settings = CASES[case]
    fresh = make()
    kept = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in fresh.items()}
    settings = dict(scale=0.125, sink_tokens=4, recent_window=8, **settings)
    workspaces = {}
    for index in range(4):
        fresh.update(fresh_queries(fresh, index))
        kept.update(fresh_queries(kept, index))
        expected = kernel.decode_attention_triton(**fresh, **settings)  # no workspaces: the JIT, fresh scratch
        jit_launches.clear()
        got = kernel.decode_attention_triton(**kept, **settings, workspaces=workspaces)
        assert torch.equal(got, expected), f"step {index}: output differs"
        for name, tensor in fresh.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(kept[name], tensor), f"step {index}: {name} differs"
        (steps,) = workspaces.values()  # one set of scratch and launches for the one shape, kept
        if index == 0:
            first = steps
        assert steps is first
        # On a GPU with direct launches, only the first step goes through Triton's JIT.
        assert bool(jit_launches) == (index == 0 or not direct or INTERPRETED), jit_launches


def counted(monkeypatch) -> list[str]:
    """Record each launch of the decode step's kernels through Triton's JIT (``kernel[grid]``), by
    kernel name; direct launches of the compiled kernels are not recorded."""
    launches = []

    class Counting:
        def __init__(self, name, function):
            self.name, self.function, self.fn = name, function, function.fn

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.function[grid]

    for name in ("_attend_split_kernel", "_score_merge_kernel", "_reallocate_kernel"):
        monkeypatch.setattr(kernel, name, Counting(name, getattr(kernel, name)))
    return launches


def test_eager_step_plans_once_allocates_only_its_output_and_launches_two_kernels(monkeypatch):
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", False)  # every launch through the JIT, where they are counted
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
    assert launches == ["_attend_split_kernel", "_score_merge_kernel"] * 3
    launches.clear()
    step = reallocating_step(2, 2, 2, 64, 64, torch.bfloat16, 64, every=1)
    kernel.decode_attention_triton(**step, scale=0.125, sink_tokens=2, recent_window=4, shared=False, score_kind=0,
                                   reallocate_every=1, min_limit=7, workspaces=workspaces)  # fmt: skip
    assert launches == ["_attend_split_kernel", "_score_merge_kernel", "_reallocate_kernel"]


def strided(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """The same values in a tensor twice as long along ``dim`` (so every stride before it doubles)."""
    return torch.cat([tensor, torch.zeros_like(tensor)], dim=dim).narrow(dim, 0, tensor.shape[dim])


LAYOUTS = {
    # name: how a step differs from the first call's, in what its kept launches depend on
    "same": lambda step, settings: (step, settings),
    "query strides": lambda step, settings: ({**step, "q": strided(step["q"], 1)}, settings),
    "new key strides": lambda step, settings: ({**step, "k_new": strided(step["k_new"], 1)}, settings),
    "new value strides": lambda step, settings: ({**step, "v_new": strided(step["v_new"], 1)}, settings),
    "cache strides": lambda step, settings: (
        {**step, "k_cache": strided(step["k_cache"], 2), "v_cache": strided(step["v_cache"], 1)},
        settings,
    ),
    "slot position strides": lambda step, settings: ({**step, "slot_pos": strided(step["slot_pos"], 1)}, settings),
    "dtype": lambda step, settings: (
        {k: v.half() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v for k, v in step.items()},
        settings,
    ),
    "scale": lambda step, settings: (step, {**settings, "scale": 0.25}),
    "sink and recent tokens": lambda step, settings: (step, {**settings, "sink_tokens": 1, "recent_window": 2}),
    "score kind": lambda step, settings: (step, {**settings, "score_kind": 1}),
}


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "same"])
def test_kept_launches_are_kept_apart_for_every_layout_and_setting_they_depend_on(layout, monkeypatch):
    """A call on a dict of kept launches whose tensors or settings differ from an earlier call's only
    in what the launches take as fixed (strides, dtypes, settings) gets launches of its own, and the
    result of a fresh call; a call like the first reuses the first's."""
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", True)
    first = random_step(2, 2, 4, 96, 64, torch.bfloat16, 80)
    settings = dict(scale=0.125, sink_tokens=4, recent_window=8, shared=True, score_kind=0)
    workspaces = {}
    for name, kept_so_far in (("same", 1), (layout, 2), ("same", 2), (layout, 2)):
        step, step_settings = LAYOUTS[name](first, settings)
        fresh = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in step.items()}  # contiguous
        kept = {k: same_layout_copy(v) if isinstance(v, torch.Tensor) else v for k, v in step.items()}
        expected = kernel.decode_attention_triton(**fresh, **step_settings)
        got = kernel.decode_attention_triton(**kept, **step_settings, workspaces=workspaces)
        assert torch.equal(got, expected), f"{name}: output differs from a fresh call's"
        for key, tensor in fresh.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(kept[key], tensor), f"{name}: {key} differs from a fresh call's"
        assert len(workspaces) == kept_so_far, f"{name}: {len(workspaces)} sets of kept launches"


def test_direct_launch_passes_every_parameter_in_the_kernels_order(monkeypatch):
    """The positional arguments of a direct launch (tensors, scalars, then constexprs in parameter
    order) bind to each kernel's parameters exactly as the JIT's keyword call does."""
    calls = []
    call = launch.KernelLaunch.__call__
    monkeypatch.setattr(
        launch.KernelLaunch, "__call__", lambda self, *t, **k: calls.append((self, t)) or call(self, *t, **k)
    )
    step = random_step(1, 2, 4, 40, 32, torch.bfloat16, 30, accumulate=True)
    kernel.decode_attention_triton(**step, scale=0.125, sink_tokens=4, recent_window=8, shared=True, score_kind=1)
    step = reallocating_step(2, 2, 2, 64, 64, torch.bfloat16, 64, every=1)
    kernel.decode_attention_triton(**step, scale=0.125, sink_tokens=2, recent_window=4, shared=False, score_kind=0,
                                   reallocate_every=1, min_limit=7)  # fmt: skip
    assert len(calls) == 5
    for launched, tensors in calls:
        signature = inspect.signature(launched.kernel.fn)
        tail = launch.constexpr_tail(launched.kernel, len(tensors) + len(launched.scalars), launched.constexprs)
        by_position = signature.bind(*tensors, *launched.scalars, *tail).arguments
        by_keyword = signature.bind(*tensors, *launched.scalars, **launched.constexprs).arguments
        assert list(by_position) == list(signature.parameters) and by_position == by_keyword


class FakeCompiled:
    """Stands in for a Triton CompiledKernel whose launcher logs each launch."""

    packed_metadata = b"packed"
    function = "function"

    def __init__(self, log):
        self.log = log

    def run(self, x, y, z, stream, function, packed, metadata, enter, leave, *args):
        self.log.append(("direct", (x, y, z), stream, metadata, enter, leave, args))

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream)


class FakeJit:
    """Stands in for a ``@triton.jit`` kernel whose JIT returns ``compiled`` (None: the interpreter)."""

    def __init__(self, log, compiled):
        self.log, self.compiled = log, compiled

    @staticmethod
    def fn(x, n, BLOCK: kernel.tl.constexpr, EVEN: kernel.tl.constexpr):
        pass

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(("jit", grid, args, kwargs)) or self.compiled


@pytest.mark.parametrize("setting, expected", [(None, True), ("1", True), ("0", False)])
def test_direct_launches_are_on_unless_the_environment_turns_them_off(setting, expected):
    env = {name: value for name, value in os.environ.items() if name != "LONGFLOW_DIRECT_LAUNCH"}
    if setting is not None:
        env["LONGFLOW_DIRECT_LAUNCH"] = setting
    code = "from longflow_patch.kernels import launch; print(launch.DIRECT_LAUNCH)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == str(expected)


class FakeTensor:
    """Stands in for a tensor: a name and an address."""

    def __init__(self, name, address):
        self.name, self.address = name, address

    def data_ptr(self):
        return self.address

    def __repr__(self):
        return self.name


def test_kernel_launch_goes_direct_only_after_a_compiled_first_call_and_only_when_allowed(monkeypatch):
    log = []
    launched = launch.KernelLaunch(
        FakeJit(log, FakeCompiled(log)), (4, 1), (7,), dict(EVEN=True, BLOCK=64), num_warps=2
    )
    x = [FakeTensor(f"x{index}", 4096 * (index + 1)) for index in range(5)]
    launched(x[0])  # not allowed: the JIT, nothing kept
    launched(x[1], direct=True, stream=5)  # the JIT compiles; its kernel is kept
    launched(x[2], direct=True, stream=5)
    launched(x[3])  # e.g. an unaligned tensor: the JIT again
    hook = object()  # a profiler's launch hook: the metadata, the hook chains and the tensors go with the launch
    monkeypatch.setattr(launch.knobs.runtime.launch_enter_hook, "calls", [hook])
    launched(x[4], direct=True, stream=6)
    enter, leave = launch.knobs.runtime.launch_enter_hook, launch.knobs.runtime.launch_exit_hook
    assert log == [
        ("jit", (4, 1, 1), (x[0], 7), dict(EVEN=True, BLOCK=64, num_warps=2)),
        ("jit", (4, 1, 1), (x[1], 7), dict(EVEN=True, BLOCK=64, num_warps=2)),
        # every parameter by position, in the kernel's order, each tensor as its address; the grid in
        # three dimensions; no hooks
        ("direct", (4, 1, 1), 5, None, None, None, (x[2].address, 7, 64, True)),
        ("jit", (4, 1, 1), (x[3], 7), dict(EVEN=True, BLOCK=64, num_warps=2)),
        ("direct", (4, 1, 1), 6, ("metadata", (4, 1, 1), 6), enter, leave, (x[4], 7, 64, True)),
    ]
    interpreted = []
    launched = launch.KernelLaunch(FakeJit(interpreted, None), (1,), (7,), dict(EVEN=True, BLOCK=64))
    for _ in range(2):
        launched(x[0], direct=True)
    assert [entry[0] for entry in interpreted] == ["jit", "jit"]
    with pytest.raises(ValueError, match="do not match its parameters"):
        launch.constexpr_tail(FakeJit(log, None), 2, dict(BLOCK=64))


def test_direct_launches_need_every_tensor_aligned_and_on_the_launching_device():
    base = torch.zeros(64, dtype=torch.bfloat16, device=DEVICE)
    here = base.get_device()  # -1 for the CPU
    assert launch.launchable_directly(here, base, base[8:])
    assert not launch.launchable_directly(here, base, base[1:])
    assert not launch.launchable_directly(here, base[4:], base)
    assert not launch.launchable_directly(here + 1, base, base[8:]), "tensors on another device"
    if torch.cuda.is_available():
        assert not launch.launchable_directly(here, base, torch.zeros(8)), "a CPU tensor beside CUDA ones"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CPU tensor beside CUDA ones needs a GPU")
def test_a_cpu_tensor_in_a_later_step_is_refused_not_launched(monkeypatch):
    """Direct launches pass bare addresses; a step with a CPU tensor among CUDA ones goes through
    the JIT, which refuses memory the GPU cannot read, instead of launching on a host address."""
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", True)
    step = random_step(1, 2, 4, 96, 64, torch.bfloat16, 96)
    settings = dict(scale=0.125, sink_tokens=4, recent_window=8, shared=True, score_kind=0)
    workspaces = {}
    for _ in range(2):
        kernel.decode_attention_triton(**step, **settings, workspaces=workspaces)
    with pytest.raises(ValueError, match="cpu tensor"):
        kernel.decode_attention_triton(**{**step, "slot_limit": step["slot_limit"].cpu()}, **settings,
                                       workspaces=workspaces)  # fmt: skip
    torch.cuda.synchronize()  # no launch on a host address left an error behind


def test_unaligned_inputs_go_through_the_jit_with_the_same_result(monkeypatch):
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", True)
    jit_launches = counted(monkeypatch)
    fresh = random_step(1, 2, 4, 96, 64, torch.bfloat16, 96)
    kept = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in fresh.items()}
    settings = dict(scale=0.125, sink_tokens=4, recent_window=8, shared=True, score_kind=0)
    workspaces = {}
    for index in range(3):
        fresh.update(fresh_queries(fresh, index))
        kept.update(fresh_queries(kept, index))
        if index > 0:  # the same values two bf16 elements (4 bytes) past an aligned start
            storage = torch.empty(kept["q"].numel() + 2, dtype=kept["q"].dtype, device=DEVICE)
            kept["q"] = storage[2:].view_as(kept["q"]).copy_(kept["q"])
        expected = kernel.decode_attention_triton(**fresh, **settings)
        jit_launches.clear()
        got = kernel.decode_attention_triton(**kept, **settings, workspaces=workspaces)
        assert torch.equal(got, expected), f"step {index}: output differs"
        assert len(jit_launches) == 2, f"step {index}: {jit_launches}"


def on_gpu_path(monkeypatch) -> list[str]:
    """Route CPU tensors the way CUDA tensors go (the launcher runs in Triton's interpreter; on a GPU
    the tensors are CUDA ones already), and record which route each step takes."""
    routes = []
    monkeypatch.setattr(ops, "runs_fused_kernel", lambda q: q.dtype in ops.KERNEL_DTYPES)
    launcher = kernel.decode_attention_triton
    monkeypatch.setattr(
        kernel, "decode_attention_triton", lambda *a, **k: routes.append("launcher") or launcher(*a, **k)
    )
    op = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a, **k: routes.append("op") or op(*a, **k))
    return routes


def test_decode_step_skips_the_op_dispatch_when_eager_and_records_the_op_when_traced(monkeypatch):
    step = random_step(1, 2, 4, 40, 32, torch.bfloat16, 30)
    args = (*step.values(), 32**-0.5, 4, 8, True, 0)
    expected = kernel.decode_attention_triton(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    routes = on_gpu_path(monkeypatch)
    got = ops.decode_step(*args, workspaces={})
    assert routes == ["launcher"] and torch.equal(got, expected)

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
    assert "launcher" not in routes


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
        patched.setattr(ops, "decode_attention", lambda *a, **k: kernel.decode_attention_triton(*a, **k))
        through_op = generate()
    routes = on_gpu_path(monkeypatch)
    assert torch.equal(generate(), through_op)
    assert set(routes) == {"launcher"} and len(routes) == 11 * model.config.num_hidden_layers
