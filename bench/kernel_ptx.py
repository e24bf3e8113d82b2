"""What the decode step's kernels compile to on a GPU architecture, on any machine (no GPU needed).

The step's launches are recorded on CPU tensors (`DecodeLaunches`, planned for ``--sms`` SMs), each
kernel is specialized as Triton's JIT would specialize it at launch (16-byte aligned pointers,
integers divisible by 16, integers equal to 1 as constants) and compiled for ``--target`` with
the PTX assembler Triton ships. Per kernel: registers and local memory (spills) from the cubin,
and the global loads and stores by width in the PTX, barriers and shuffles. A 16-byte load
(``v4``) moves four 32-bit words at once (four float32, or eight fp16 logits); Triton emits it only
where the pointer is aligned and the mask is constant over the vector, so the counts show which
tiles move as vectors.

    python bench/kernel_ptx.py --batch 64 --slots 1740            # the 8B throughput row at 8k

Run outside Triton's interpreter (``TRITON_INTERPRET`` unset): it compiles, never launches.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longflow_patch.kernels import decode_attention
from longflow_patch.kernels.launch import KernelLaunch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules (`common`), also under python -P
from common import environment, print_table, write_results
from decode_op import SETTINGS, make_inputs

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
                 torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}  # fmt: skip
NVIDIA_BIN = Path(triton.backends.nvidia.__file__).parent / "bin"


def record_launches(
    batch: int, slots: int, shared: bool, num_sms: int, preparation: str = "none"
) -> list[tuple[KernelLaunch, tuple]]:
    """The decode step's launches for one shape, as ``(launch, tensors)``, without running any
    (``preparation``: what the op does to the new token first, `decode_op.make_inputs`)."""
    recorded = []
    call, count = KernelLaunch.__call__, decode_attention.multiprocessor_count
    KernelLaunch.__call__ = lambda self, *tensors, **_: recorded.append((self, tensors))
    decode_attention.multiprocessor_count = lambda device: num_sms
    try:
        inputs = make_inputs(batch, slots, preparation=preparation)
        decode_attention.decode_attention_triton(**inputs, **{**SETTINGS, "shared": shared})
    finally:
        KernelLaunch.__call__, decode_attention.multiprocessor_count = call, count
    return recorded


def compile_launch(launch: KernelLaunch, tensors: tuple, target: GPUTarget) -> triton.compiler.CompiledKernel:
    """``launch``'s kernel compiled for ``target``, specialized on ``tensors`` and its fixed arguments."""
    kernel = launch.kernel
    # Tensors, then scalars, in parameter order; the constexprs after them come by name.
    values = dict(zip(kernel.arg_names, (*tensors, *launch.scalars), strict=False))
    signature, constants, attrs = {}, dict(launch.constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        value = values.get(name)
        if name in constants or value is None:
            signature[name] = "constexpr"
            constants.setdefault(name, value)
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=target, options=dict(launch.options))  # the backend's defaults for the rest


def resource_usage(cubin: bytes) -> dict:
    """Registers and local memory per thread (spills show as local memory), from ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        dump = subprocess.run([NVIDIA_BIN / "cuobjdump", "--dump-resource-usage", file.name],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {"registers": int(re.search(r"REG:(\d+)", dump)[1]), "local_bytes": int(re.search(r"LOCAL:(\d+)", dump)[1])}


def ptx_counts(ptx: str) -> dict:
    """Global loads and stores by width, barriers and warp shuffles, as written in the PTX."""
    counts = {}
    for op in ("ld", "st"):
        accesses = re.findall(rf"\b{op}\.global(?:\.\w+)*?\.(v4|v2|b\d+)\b", ptx)
        counts[f"{op}_v4"] = accesses.count("v4")
        counts[f"{op}_v2"] = accesses.count("v2")
        counts[f"{op}_scalar"] = len(accesses) - counts[f"{op}_v4"] - counts[f"{op}_v2"]
    counts["barriers"] = len(re.findall(r"\bbar\.sync\b", ptx))
    counts["shuffles"] = len(re.findall(r"\bshfl\.sync\b", ptx))
    return counts


def kernel_rows(batch: int, slots: int, shared: bool, num_sms: int, target: GPUTarget, preparation: str) -> list[dict]:
    rows = []
    for launch, tensors in record_launches(batch, slots, shared, num_sms, preparation):
        compiled = compile_launch(launch, tensors, target)
        rows.append({"kernel": launch.kernel.fn.__name__, "preparation": preparation, "batch": batch, "slots": slots,
                     "shared": shared,
                     "grid": "x".join(map(str, launch.grid)), "num_warps": launch.options.get("num_warps"),
                     **resource_usage(compiled.asm["cubin"]), **ptx_counts(compiled.asm["ptx"])})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--slots", type=int, nargs="+", default=[1740])
    parser.add_argument("--per-head", action="store_true", help="eviction per KV head (default: shared)")
    parser.add_argument("--preparation", nargs="+", choices=["none", "rope", "qwen3"], default=["none", "qwen3"],
                        help="what the op does to the new token first: nothing (q, k come rotated), RoPE, or "
                        "Qwen3's q/k norms and RoPE (what a Qwen3 decode step runs on a GPU)")  # fmt: skip
    parser.add_argument("--sms", type=int, default=132, help="SMs the launches are planned for (H100 SXM: 132)")
    parser.add_argument("--target", default="cuda:90", help="backend:arch, e.g. cuda:90 (Hopper), cuda:80")
    parser.add_argument("--out", default="bench/results/kernel_ptx.json")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_ptx: unset TRITON_INTERPRET; this compiles the kernels, it never runs them")
    backend, arch = args.target.split(":")
    target = GPUTarget(backend, int(arch), 32)
    rows = [row for preparation in args.preparation for batch in args.batch for slots in args.slots
            for row in kernel_rows(batch, slots, not args.per_head, args.sms, target, preparation)]  # fmt: skip
    print_table(rows, list(rows[0]))
    write_results(args.out, {"benchmark": "kernel_ptx", "environment": environment(), "target": args.target,
                             "sms": args.sms, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
