"""Repeated launches of a Triton kernel without the JIT's per-call work.

``kernel[grid](*args, **constexprs)`` binds the arguments, computes how they specialize the kernel
(dtypes, 16-byte alignment of each pointer, integers equal to 1 or divisible by 16), hashes that to
find the compiled kernel, and only then launches it. For a decode step's kernels (about 35
arguments each) that host work is most of an eager step at batch 1 (`bench/decode_op.py --eager`).

`KernelLaunch` is one launch whose grid, scalar arguments and constexprs are fixed, as a decode
step plans them once per shape. Its first call goes through the JIT, which compiles the kernel
(or finds it compiled) and returns it. Later calls may launch that compiled kernel directly with
the new tensors and the fixed arguments, in the kernel's parameter order: the way Triton's
fused-softmax tutorial launches a warmed-up kernel. This is valid only while the tensors
specialize the kernel as on the first call:

- callers keep one `KernelLaunch` per combination of tensor dtypes and scalar arguments;
- every tensor must be 16-byte aligned and on the current CUDA device, on the first call and on
  each direct one (the caller checks, `launchable_directly`); any other sends the call through
  the JIT, which raises for memory the GPU cannot read;
- the current CUDA device is the first call's (callers key their launches by it too).

A direct launch hands the launcher each tensor's address as an integer. For a tensor the launcher
would call its ``data_ptr()`` and ask the driver whether the address is device memory, for every
tensor of every launch: on an H100's host the bare launcher took 7.4-9.0 µs a call with tensors and
5.1-5.7 µs with addresses (`bench/eager_host.py`, `bench/results/eager_host_h100.json`). The
caller's check stands in for the driver's.

A direct launch hands the compiled kernel's launcher the CUDA stream its caller looked up once per
step, and, while no launch hook is set (``triton.knobs.runtime.launch_enter_hook`` /
``launch_exit_hook``, which profilers set), no launch metadata: Triton's own launcher builds that
record and calls both hook chains on every launch, even empty ones. With a hook set, direct launches
build the metadata and call the hooks as the JIT does. The JIT's pre-run hooks never see them.
Under Triton's interpreter the JIT returns no compiled kernel, so every call goes through it.

Direct launches are on unless ``LONGFLOW_DIRECT_LAUNCH=0`` is set (``DIRECT_LAUNCH``). On an
H200 they cut an eager decode step at batch 1 from 113-185 µs to 62-98 µs, bit for bit the JIT's
result (`bench/results/speed_eager_op_h200_direct.json`, ``tests/test_eager_path.py``).
"""

import inspect
import os

import torch
import triton.language as tl
from triton import knobs

DIRECT_LAUNCH = os.environ.get("LONGFLOW_DIRECT_LAUNCH", "1") != "0"


def launchable_directly(device_index: int, *tensors: torch.Tensor) -> bool:
    """Whether every tensor is on CUDA device ``device_index`` and its data starts on a 16-byte
    boundary (how Triton specializes pointers): what a direct launch, which passes bare addresses,
    needs of the tensors it is given."""
    address = 0
    for tensor in tensors:
        if tensor.get_device() != device_index:
            return False
        address |= tensor.data_ptr()
    return address % 16 == 0


def constexpr_tail(kernel: object, leading: int, constexprs: dict) -> tuple:
    """The values of ``constexprs`` in the order of ``kernel``'s parameters (a ``@triton.jit``
    function), checked to be exactly its parameters after the first ``leading``: a direct launch
    passes every parameter by position, tensors and scalars first."""
    params = list(inspect.signature(kernel.fn).parameters.values())
    names = [param.name for param in params[leading:]]
    if any(param.annotation is tl.constexpr for param in params[:leading]) or sorted(names) != sorted(constexprs):
        raise ValueError(f"{kernel.fn.__name__}: {leading} arguments and constexprs {sorted(constexprs)} "
                         f"do not match its parameters {[param.name for param in params]}")  # fmt: skip
    return tuple(constexprs[name] for name in names)


class KernelLaunch:
    """``kernel[grid](*tensors, *scalars, **constexprs, **options)`` with everything but the tensors
    fixed; called with the tensors (the kernel's leading parameters). See the module docstring for
    when a call launches the compiled kernel directly."""

    def __init__(self, kernel: object, grid: tuple[int, ...], scalars: tuple, constexprs: dict, **options: int):
        self.kernel = kernel
        self.grid = (*grid, 1, 1)[:3]  # three dimensions: the compiled kernel's launcher reads all three
        self.scalars = scalars
        self.constexprs = constexprs
        self.options = options
        self.compiled: object | None = None  # the JIT's CompiledKernel, once a direct-eligible call made it
        self.fixed_tail: tuple = ()  # scalars, then constexprs in parameter order

    def __call__(self, *tensors: torch.Tensor, direct: bool = False, stream: int | None = None) -> None:
        """Launch over ``tensors``. ``direct``: the caller has checked that they specialize the
        kernel as on the first direct-eligible call (same dtypes, all aligned) and lie on the
        current CUDA device (`launchable_directly`), and ``stream`` is the current CUDA stream's handle."""
        compiled = self.compiled
        if direct and compiled is not None:
            enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
            if enter.calls or leave.calls:  # hook chains, empty unless a profiler listens: it sees the tensors
                args = (*tensors, *self.fixed_tail)
                metadata = compiled.launch_metadata(self.grid, stream, *args)
            else:
                args = (*[tensor.data_ptr() for tensor in tensors], *self.fixed_tail)
                metadata, enter, leave = None, None, None
            compiled.run(*self.grid, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *args)
            return
        compiled = self.kernel[self.grid](*tensors, *self.scalars, **self.constexprs, **self.options)
        # A CompiledKernel on a GPU; None from the interpreter.
        if direct and compiled is not None and hasattr(compiled, "packed_metadata"):
            leading = len(tensors) + len(self.scalars)
            self.fixed_tail = self.scalars + constexpr_tail(self.kernel, leading, self.constexprs)
            self.compiled = compiled  # its launch loaded the module: compiled.function and .run are set
