"""The token-level progress bar (longflow_patch.progress) and ``--help`` on every recipe."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm
from transformers import StoppingCriteriaList

import longflow_patch
from longflow_patch.progress import TokenProgress

from models import left_padded_prompts, tiny_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_token_progress_counts_every_sequence_step_and_changes_no_token():
    model = tiny_model()
    model.generation_config.eos_token_id = None
    ids, mask = left_padded_prompts(batch=3)
    longflow_patch.apply(model, policy="longflow", budget=16)  # evicts: prompts of 12 + 20 new
    settings = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **settings)
        with tqdm(file=io.StringIO(), unit="tok") as bar:
            watched = model.generate(ids, **settings, stopping_criteria=StoppingCriteriaList([TokenProgress(bar)]))
    assert bar.n == 3 * 20
    assert torch.equal(plain, watched)


@pytest.mark.parametrize("recipe", sorted(path.name for path in RECIPES.iterdir() if path.suffix in (".py", ".sh")))
def test_every_recipe_has_help(recipe):
    command = ["bash"] if recipe.endswith(".sh") else [sys.executable]
    result = subprocess.run([*command, str(RECIPES / recipe), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
