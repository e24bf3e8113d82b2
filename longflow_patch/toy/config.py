"""The toy reasoner's architecture: a small Qwen3 (about 3.4M parameters, 13.5 MB in float32)."""

from transformers import Qwen3Config

from longflow_patch.toy.tokenizer import BOS, EOS, MAX_LENGTH, PAD, VOCAB

# 100 tokens, rounded up so the embedding and output matrices have aligned shapes
VOCAB_SIZE = 128


def model_config(**overrides: object) -> Qwen3Config:
    """The bundled model's configuration; ``overrides`` replace any field (the recipe's smoke mode
    shrinks the model this way). 8 query heads share 2 KV heads of 32 dimensions, a size the fused
    decode kernel supports."""
    settings = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": MAX_LENGTH,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "tie_word_embeddings": True,
        "pad_token_id": VOCAB[PAD],
        "bos_token_id": VOCAB[BOS],
        "eos_token_id": VOCAB[EOS],
    }
    settings.update(overrides)
    return Qwen3Config(**settings)
