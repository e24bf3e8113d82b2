"""The toy reasoner's tokenizer: one token per character, built with the `tokenizers` library.

Vocabulary (ids): ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then newline and the 95
printable ASCII characters (4..99). Encoding prepends ``<bos>``; decoding joins the characters
back unchanged, so ``decode(encode(text), skip_special_tokens=True) == text`` for any text made
of these characters. Padding is on the left, for batched generation.
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = "\n" + "".join(chr(code) for code in range(32, 127))
VOCAB = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
MAX_LENGTH = 8192


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer (ids as in the module docstring)."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_LENGTH,
    )
