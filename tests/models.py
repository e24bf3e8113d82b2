"""Tiny random-weight models of each supported architecture, built from configs (no downloads)."""

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}

# query heads : KV heads
HEAD_LAYOUTS = {"gqa": (4, 2), "mqa": (4, 1), "mha": (4, 4)}


def tiny_model(
    arch: str = "qwen3",
    heads: str = "gqa",
    layers: int = 2,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    config_cls, model_cls = ARCHITECTURES[arch]
    num_heads, kv_heads = HEAD_LAYOUTS[heads]
    config = config_cls(
        vocab_size=128,
        hidden_size=num_heads * head_dim,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_cls(config).to(dtype).eval()


def left_padded_prompts(batch: int = 3, length: int = 12, vocab: int = 128, seed: int = 0):
    """Random prompts, row i left-padded by i tokens (pad id 0); returns (input_ids, attention_mask)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, :row] = 0
        ids[row, :row] = 0
    return ids, mask
