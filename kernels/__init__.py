"""Triton kernels of longflow-patch, each beside its plain PyTorch reference.

Installed as ``longflow_patch.kernels`` (the wheel maps this folder there), so no top-level
module named ``kernels`` is installed.
"""

from .decode_attention_reference import ScoreKind, decode_attention_reference

__all__ = ["ScoreKind", "decode_attention_reference"]
