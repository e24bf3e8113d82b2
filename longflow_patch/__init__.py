"""longflow-patch: memory-bounded long-output generation for Hugging Face transformers.

import longflow_patch
longflow_patch.apply(model, policy="longflow", budget=2048)
out = model.generate(**inputs, max_new_tokens=32768)
"""

from longflow_patch.cache import LongFlowCache, LongFlowLayer
from longflow_patch.draft_tree import DraftTree
from longflow_patch.glide import GlideConfig, GlideDraft, load_glide_draft, save_glide_draft
from longflow_patch.kernels.verify_attention_reference import merge_attention_states
from longflow_patch.patch import SUPPORTED_MODELS, apply, new_cache, unapply
from longflow_patch.policies import (
    POLICIES,
    SCORERS,
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
from longflow_patch.speculative import SpeculativeStats, speculative_generate
from longflow_patch.speculative_cache import DraftCache, SpeculativeCache

__all__ = [
    "POLICIES",
    "SCORERS",
    "SUPPORTED_MODELS",
    "CompactingPolicy",
    "DraftCache",
    "DraftTree",
    "FullCachePolicy",
    "GlideConfig",
    "GlideDraft",
    "H2OPolicy",
    "LongFlowCache",
    "LongFlowLayer",
    "LongFlowPolicy",
    "Policy",
    "RKVPolicy",
    "RandomPolicy",
    "SnapKVPolicy",
    "SpeculativeCache",
    "SpeculativeStats",
    "StreamingLLMPolicy",
    "apply",
    "load_glide_draft",
    "make_policy",
    "merge_attention_states",
    "new_cache",
    "save_glide_draft",
    "speculative_generate",
    "unapply",
]
