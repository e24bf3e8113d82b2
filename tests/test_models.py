"""`longflow_patch.models.load_pretrained`: what the recipes load a model directory with."""

from longflow_patch import toy
from longflow_patch.models import load_pretrained


def test_a_model_directory_loads_in_eval_mode_with_a_left_padding_tokenizer():
    model, tokenizer = load_pretrained(toy.model_path())
    assert not model.training and next(model.parameters()).device.type == "cpu"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    batch = tokenizer(["a", "a b c"], padding=True)
    assert batch["attention_mask"][0][0] == 0, "the shorter row is padded on the left"
