"""longflow-patch: memory-bounded long-output generation for Hugging Face transformers.

import longflow_patch
longflow_patch.apply(model, policy="longflow", budget=2048)
out = model.generate(**inputs, max_new_tokens=32768)
"""

from longflow_patch.cache import LongFlowCache, LongFlowLayer
from longflow_patch.patch import SUPPORTED_MODELS, apply, new_cache, unapply
from longflow_patch.policies import (
    POLICIES,
    CompactingPolicy,
    FullCachePolicy,
    H2OPolicy,
    LongFlowPolicy,
    Policy,
    RandomPolicy,
    RKVPolicy,
    SnapKVPolicy,
    StreamingLLMPolicy,
    make_policy,
)

__all__ = [
    "POLICIES",
    "SUPPORTED_MODELS",
    "CompactingPolicy",
    "FullCachePolicy",
    "H2OPolicy",
    "LongFlowCache",
    "LongFlowLayer",
    "LongFlowPolicy",
    "Policy",
    "RKVPolicy",
    "RandomPolicy",
    "SnapKVPolicy",
    "StreamingLLMPolicy",
    "apply",
    "make_policy",
    "new_cache",
    "unapply",
]
