"""LongSpec's draft model (GLIDE): one decoder layer that reads the target's own KV cache.

    draft = longflow_patch.load_glide_draft(longflow_patch.toy.glide_path(), target=model)
    out = longflow_patch.speculative_generate(model, input_ids, draft=draft, num_draft_tokens=4)
    out = longflow_patch.speculative_generate(model, input_ids, draft=draft, draft_tree=(4, 4, 4, 4))

The layer (LongSpec's ``Qwen2GlideDecoderLayer``, github.com/sail-sg/LongSpec), on one token::

    h  = embed(token)                          the target's embedding
    h += self_attn(norm(h))                    over the draft's own cache: the first ``sink_tokens``
                                               positions and the last ``window`` (constant size)
    h += cross_attn(norm(h))                   a query only: keys and values are the target's cache
                                               of layer ``target_layer`` (its last), as they stand
    h += mlp(norm(h))
    logits = lm_head(norm(h))                  the target's LM head

So the draft sees the whole context through the target's cache and adds a few MB of weights. Its
self-attention reads the token embedding, so its keys and values depend on the token and its
position only: filling its cache needs no attention (`GlideDraft.self_key_values`).

Positions and RoPE are the target's (its rotary module), so the draft's cross-attention queries and
the target's cached keys are rotated consistently. Training (``recipes/train_glide_draft.py``)
shifts every position but the sinks by a random offset (LongSpec's anchor-offset indices).

Files: ``glide_config.json`` (`GlideConfig`) and ``model.safetensors`` (this layer's weights only:
the embedding and LM head stay the target's); `save_glide_draft` / `load_glide_draft`.
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRMSNorm as RMSNorm
from transformers.models.llama.modeling_llama import rotate_half

from longflow_patch.compat import cache_keyword

CONFIG_FILE = "glide_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "longflow-glide-draft"


@dataclasses.dataclass(frozen=True)
class GlideConfig:
    """Shapes of a GLIDE draft; the first six must equal its target's (`GlideDraft.check_target`).

    ``qk_norm``: per-head RMSNorm of queries and keys before RoPE (Qwen3's layout).
    ``sink_tokens`` / ``window``: the self-attention's cache, the first positions and the last ones.
    ``target_layer``: the target layer whose KV cache the cross-attention reads (-1: the last).
    """

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False
    sink_tokens: int = 4
    window: int = 512
    target_layer: int = -1

    MATCHED = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")

    @classmethod
    def from_target(cls, target_config, **overrides: object) -> "GlideConfig":
        """A config shaped like ``target_config`` (a transformers config); ``overrides`` replace fields."""
        head_dim = (
            getattr(target_config, "head_dim", None) or target_config.hidden_size // target_config.num_attention_heads
        )
        settings = dict(
            hidden_size=target_config.hidden_size,
            num_attention_heads=target_config.num_attention_heads,
            num_key_value_heads=target_config.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=target_config.vocab_size,
            intermediate_size=target_config.intermediate_size,
            rms_norm_eps=target_config.rms_norm_eps,
            qk_norm=target_config.model_type == "qwen3",
        )
        settings.update(overrides)
        return cls(**settings)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``[B, H, T, D]`` with the target's ``cos`` / ``sin`` ``[B, T, D]``."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class GlideAttention(nn.Module):
    """Projections of one attention block. ``self_attn`` has all four; ``cross_attn`` only the query
    and output ones (its keys and values are the target's)."""

    def __init__(self, config: GlideConfig, cross: bool):
        super().__init__()
        hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                             config.num_key_value_heads, config.head_dim)  # fmt: skip
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps) if config.qk_norm else None
        if not cross:
            self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
            self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.head_dim = head_dim

    def heads(self, projected: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
        """``[B, T, H * D]`` -> ``[B, H, T, D]``, normalised per head when the config says so."""
        batch, length = projected.shape[:2]
        split = projected.view(batch, length, -1, self.head_dim)
        return (split if norm is None else norm(split)).transpose(1, 2)

    def query(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated queries ``[B, Hq, T, D]`` of ``hidden`` ``[B, T, hidden]``."""
        return rotate(self.heads(self.q_proj(hidden), self.q_norm), cos, sin)

    def key_values(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated keys and values ``[B, Hkv, T, D]`` of ``hidden`` ``[B, T, hidden]``."""
        keys = rotate(self.heads(self.k_proj(hidden), self.k_norm), cos, sin)
        return keys, self.heads(self.v_proj(hidden), None)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """``[B, Hq, T, D]`` -> ``[B, T, hidden]``."""
        return self.o_proj(attended.transpose(1, 2).flatten(2))


# (queries [B, Hq, T, D], keys, values [B, Hkv, T, D]) -> [B, Hq, T, D]
SelfAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# queries [B, Hq, T, D] -> [B, Hq, T, D]
CrossAttention = Callable[[torch.Tensor], torch.Tensor]


class GlideDraft(nn.Module):
    """The draft layer's weights and its forward; the attention over caches is the caller's
    (`forward`'s callbacks), so training and decoding share the layer."""

    def __init__(self, config: GlideConfig):
        super().__init__()
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"{config.num_attention_heads} query heads do not group over "
                             f"{config.num_key_value_heads} KV heads")  # fmt: skip
        self.config = config
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = GlideAttention(config, cross=False)
        self.post_self_attention_layernorm = RMSNorm(hidden, eps)
        self.cross_attn = GlideAttention(config, cross=True)
        self.post_cross_attention_layernorm = RMSNorm(hidden, eps)
        self.gate_proj = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)

    def check_target(self, target: nn.Module) -> None:
        """ValueError naming every field where this draft's config differs from ``target``'s."""
        expected = GlideConfig.from_target(target.config)
        wrong = [f"{name} {getattr(self.config, name)} (target: {getattr(expected, name)})"
                 for name in GlideConfig.MATCHED if getattr(self.config, name) != getattr(expected, name)]  # fmt: skip
        if wrong:
            raise ValueError(f"the GLIDE draft does not fit this target: {', '.join(wrong)}")
        layers = target.config.num_hidden_layers
        if not -layers <= self.config.target_layer < layers:
            raise ValueError(f"the draft reads target layer {self.config.target_layer}; the target has {layers}")

    def target_layer_index(self, num_layers: int) -> int:
        """The target layer the cross-attention reads, as a non-negative index."""
        return self.config.target_layer % num_layers

    def init_from_target(self, target: nn.Module) -> "GlideDraft":
        """Copy the target's layer ``target_layer`` into this layer (a starting point for training):
        the self-attention and MLP from it, the cross-attention's query and output projections from its
        attention (whose keys the cross-attention reads), every norm from the matching one."""
        layer = target.model.layers[self.target_layer_index(len(target.model.layers))]
        attention = layer.self_attn
        pairs = [(self.input_layernorm, layer.input_layernorm), (self.post_self_attention_layernorm,
                 layer.input_layernorm), (self.post_cross_attention_layernorm, layer.post_attention_layernorm),
                 (self.norm, target.model.norm), (self.gate_proj, layer.mlp.gate_proj),
                 (self.up_proj, layer.mlp.up_proj), (self.down_proj, layer.mlp.down_proj)]  # fmt: skip
        for block in (self.self_attn, self.cross_attn):
            pairs += [(block.q_proj, attention.q_proj), (block.o_proj, attention.o_proj)]
            if block.q_norm is not None:
                pairs.append((block.q_norm, attention.q_norm))
        pairs += [(self.self_attn.k_proj, attention.k_proj), (self.self_attn.v_proj, attention.v_proj)]
        if self.self_attn.k_norm is not None:
            pairs.append((self.self_attn.k_norm, attention.k_norm))
        with torch.no_grad():
            for mine, theirs in pairs:
                mine.weight.copy_(theirs.weight)
        return self

    def self_key_values(self, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The self-attention's rotated keys and values ``[B, Hkv, T, D]`` of token embeddings
        ``[B, T, hidden]``: what the draft's cache holds for those tokens."""
        return self.self_attn.key_values(self.input_layernorm(embeds), cos, sin)

    def forward(self, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, self_attention: SelfAttention,
                cross_attention: CrossAttention) -> torch.Tensor:  # fmt: skip
        """Final hidden states ``[B, T, hidden]`` (normed, for the target's LM head) of token
        embeddings ``embeds`` ``[B, T, hidden]`` at the positions of the target's RoPE ``cos`` /
        ``sin`` ``[B, T, D]``. ``self_attention(q, k, v)`` attends the draft's own keys (these tokens'
        among them), ``cross_attention(q)`` the target's cache."""
        normed = self.input_layernorm(embeds)
        keys, values = self.self_attn.key_values(normed, cos, sin)
        hidden = embeds + self.self_attn.output(self_attention(self.self_attn.query(normed, cos, sin), keys, values))
        query = self.cross_attn.query(self.post_self_attention_layernorm(hidden), cos, sin)
        hidden = hidden + self.cross_attn.output(cross_attention(query))
        normed = self.post_cross_attention_layernorm(hidden)
        hidden = hidden + self.down_proj(F.silu(self.gate_proj(normed)) * self.up_proj(normed))
        return self.norm(hidden)


def self_attention_mask(length: int, sink_tokens: int, window: int, device: torch.device) -> torch.Tensor:
    """``[T, T]`` bool: token ``i`` sees token ``j <= i`` that is a sink (``j < sink_tokens``) or in
    its window (``j > i - window``), the visibility of the draft's own cache during decoding."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None]
    return (j <= i) & ((j < sink_tokens) | (j > i - window))


def cross_attention_mask(length: int, lag: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` bool: token ``i`` of row ``b`` sees the target's keys ``j <= i - lag[b]``.

    While drafting, the target's cache lags the draft: the round's first draft step reads a cache
    that ends one token before its input, the ``d``-th one ``d`` tokens before. Training samples
    ``lag`` ``[B]`` (int64, >= 1) per row. The first tokens of a row, with nothing to see, see key 0
    (they are prompt tokens, outside the loss).
    """
    i = torch.arange(length, device=lag.device)[:, None]
    j = torch.arange(length, device=lag.device)[None]
    return (j <= (i - lag[:, None, None]).clamp_min(0))[:, None]


@torch.no_grad()
def target_key_values(
    target: nn.Module, ids: torch.Tensor, positions: torch.Tensor, layer: int
) -> tuple[torch.Tensor, ...]:
    """The target's layer ``layer`` keys (rotated at ``positions`` ``[B, T]``) and values
    ``[B, Hkv, T, D]`` over ``ids`` ``[B, T]``: what the draft's cross-attention reads; and its last
    hidden states ``[B, T, H]`` (through ``target.lm_head``, its own next-token logits)."""
    cache = DynamicCache(config=target.config)
    output = target.model(input_ids=ids, position_ids=positions, use_cache=True, **{cache_keyword(target.model): cache})
    return cache.layers[layer].keys, cache.layers[layer].values, output.last_hidden_state


def teacher_forced_logits(draft: GlideDraft, target: nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                          lag: torch.Tensor, target_keys: torch.Tensor,
                          target_values: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The draft's logits ``[B, T, V]`` (float32) at every token of ``ids`` ``[B, T]`` at once, as in
    training: self-attention under the decoding cache's sink-and-window mask, cross-attention over the
    target's keys (`target_key_values`) ``lag`` ``[B]`` tokens behind. Decoding gives the same logits
    (``tests/test_glide.py``)."""
    config, length = draft.config, ids.shape[1]
    embeds = target.get_input_embeddings()(ids)
    cos, sin = target.model.rotary_emb(embeds, positions)
    own = self_attention_mask(length, config.sink_tokens, config.window, ids.device)
    lagged = cross_attention_mask(length, lag)
    scale = config.head_dim**-0.5

    def self_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=own, scale=scale, enable_gqa=True)

    def cross_attention(query: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, target_keys, target_values, attn_mask=lagged, scale=scale,
                                              enable_gqa=True)  # fmt: skip

    return target.lm_head(draft(embeds, cos, sin, self_attention, cross_attention)).float()


def save_glide_draft(draft: GlideDraft, directory: str | Path, **metadata: object) -> Path:
    """Write ``glide_config.json`` (the config, plus ``metadata`` such as how it was trained) and
    ``model.safetensors`` (float32) into ``directory``; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, **dataclasses.asdict(draft.config), "metadata": metadata}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({name: tensor.detach().float().contiguous() for name, tensor in draft.state_dict().items()},
              str(directory / WEIGHTS_FILE))  # fmt: skip
    return directory


def read_glide_config(directory: str | Path) -> tuple[GlideConfig, dict]:
    """The `GlideConfig` in ``directory`` and its metadata; FileNotFoundError / ValueError when absent or
    not a GLIDE draft's."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no GLIDE draft config at {path}")
    fields = json.loads(path.read_text())
    if fields.pop("format", None) != FORMAT:
        raise ValueError(f'{path} is not a GLIDE draft config (no "format": "{FORMAT}")')
    metadata = fields.pop("metadata", {})
    return GlideConfig(**fields), metadata


def load_glide_draft(
    directory: str | Path,
    target: nn.Module | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> GlideDraft:
    """The GLIDE draft saved in ``directory``, in eval mode. Given ``target``, its config is checked
    against the target's (ValueError naming the mismatches) and it takes the target's dtype and
    device unless ``dtype`` / ``device`` say otherwise."""
    config, _ = read_glide_config(directory)
    draft = GlideDraft(config)
    draft.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
    if target is not None:
        draft.check_target(target)
        parameter = next(target.parameters())
        dtype, device = dtype or parameter.dtype, device or parameter.device
    return draft.to(dtype=dtype, device=device).eval()
