"""Run Triton kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Importing this module before Triton sets the variable when no GPU is present, and mends one
interpreter defect: its ``tl.dot`` multiplies bfloat16 operands as their raw 16-bit patterns
(integers). The kernels under test stay exactly the code that runs on the GPU.
"""

import os

import torch

INTERPRETED = not torch.cuda.is_available()
if INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"

    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    _create_dot = interpreter.InterpreterBuilder.create_dot

    def _as_float32(handle: "interpreter.TensorHandle") -> "interpreter.TensorHandle":
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        widened = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(widened, tl.float32)

    def _create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return _create_dot(self, _as_float32(a), _as_float32(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = _create_dot_bf16
