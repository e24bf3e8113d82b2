"""Run Triton kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Importing this module before Triton sets the variable when no GPU is present, and mends two
interpreter defects; the kernels under test stay exactly the code that runs on the GPU:

- its ``tl.dot`` multiplies bfloat16 operands as their raw 16-bit patterns (integers);
- (Triton 3.6 with NumPy 2.4 and later) a scalar used as an index or a loop bound is converted
  with ``int()`` of a one-element array, which NumPy 2.4 made an error; it is read with ``.item()``;
- (Triton 3.7 and later) a comparison's result carries its operands' type instead of ``int1``, so
  broadcasting a scalar condition against a block (``block_mask & scalar_mask``) fills the block
  with int32, which a load or store then rejects as a mask ("mask has unsupported dtype"). A
  broadcast now takes the element type of the type it produces.
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

    _create_splat = interpreter.InterpreterBuilder.create_splat

    def _create_splat_as_result_type(self, ret_ty, arg):
        splat = _create_splat(self, ret_ty, arg)
        element = ret_ty.scalar
        return interpreter.TensorHandle(splat.data.astype(interpreter._get_np_dtype(element), copy=False), element)

    interpreter.InterpreterBuilder.create_splat = _create_splat_as_result_type

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor_scalar_index(tensor, scope) -> None:
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor_scalar_index
