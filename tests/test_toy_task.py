"""The toy reasoner's task, tokenizer, bundled files and training recipe (CPU smoke run)."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longflow_patch import toy
from longflow_patch.toy.task import STEPS_PER_BLOCK, parse_answer

from recipe_loader import load_recipe


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("train_toy_reasoner.py")


@pytest.fixture(scope="module")
def tokenizer():
    return toy.build_tokenizer()


def lookups(solution: str) -> list[tuple[int, str]]:
    """(character offset of the looked-up value, key) for every step of a reference solution."""
    return [(match.start(2), match.group(1)) for match in re.finditer(r">([a-z]) [a-z]=(\d)", solution)]


def test_problems_are_deterministic_and_fresh_across_seeds():
    assert toy.make_problems(6, seed=3, with_solution=True) == toy.make_problems(6, seed=3, with_solution=True)
    prompts = [problem["prompt"] for seed in range(4) for problem in toy.make_problems(6, seed)]
    assert len(set(prompts)) == len(prompts)
    assert set(toy.make_problems(1, 0)[0]) == {"prompt", "answer"}


def test_trace_lengths_are_fixed_by_blocks_and_span_1k_to_4k_tokens(tokenizer):
    problems = toy.make_problems(40, seed=0, with_solution=True)
    lengths = {}
    for problem in problems:
        tokens = len(tokenizer(problem["solution"], add_special_tokens=False).input_ids)
        lengths.setdefault(toy.parse_prompt(problem["prompt"]).blocks, set()).add(tokens)
    assert set(lengths) == set(range(2, 7)), "the default draws 2..6 blocks"
    assert all(len(sizes) == 1 for sizes in lengths.values()), "a problem's length is set by its blocks alone"
    assert 1000 <= min(lengths[2]) and max(lengths[6]) <= 4000
    short, long = (len(toy.make_problems(1, 0, blocks=b, with_solution=True)[0]["solution"]) for b in (1, 9))
    assert short < 700 and long > 6000, "the number of blocks controls the trace length"
    with pytest.raises(ValueError, match="blocks"):
        toy.make_problems(1, 0, blocks=10)


def test_tokenizer_round_trips_generated_text_and_matches_recipe_encoder(tokenizer, recipe):
    texts = [problem["prompt"] + problem["solution"] for problem in toy.make_problems(5, 1, with_solution=True)]
    texts.append("".join(toy.tokenizer.CHARACTERS) + " \n\n  trailing spaces  ")
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1, "one token per character"
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert ids[1:] == recipe.encode(text).tolist()
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch.input_ids[0][:2] == [tokenizer.pad_token_id] * 2, "padding is on the left, for generation"


def test_is_correct_on_right_wrong_and_malformed_completions():
    problem = toy.make_problems(1, seed=2, with_solution=True)[0]
    answer, solution = problem["answer"], problem["solution"]
    assert toy.is_correct(solution, answer)
    assert toy.is_correct("...\nanswer: " + answer + "  \n", answer)
    wrong = str((int(answer[-1]) + 1) % 10)
    assert not toy.is_correct(solution.replace(f"answer: {answer}", f"answer: {answer[:-1]}{wrong}"), answer)
    assert not toy.is_correct(f"answer: {answer}\n001 ...\nanswer: 9{answer}", answer), "the last answer line counts"
    for malformed in ("", solution.rsplit("answer:", 1)[0], f"answer: {answer}x", f"the answer: {answer}", "answer:"):
        assert not toy.is_correct(malformed, answer), malformed
        assert parse_answer(malformed) is None


def test_reference_solution_is_correct_and_follows_from_the_prompt():
    for problem in toy.make_problems(10, seed=4, with_solution=True):
        assert toy.solve(problem["prompt"]) == problem["solution"]
        assert toy.is_correct(problem["solution"], problem["answer"])
        blocks = toy.parse_prompt(problem["prompt"]).blocks
        assert len(problem["answer"]) == 2 * blocks and len(lookups(problem["solution"])) == blocks * STEPS_PER_BLOCK
    with pytest.raises(ValueError, match="not a toy-task prompt"):
        toy.parse_prompt("vars: a=1\nblocks: 2\n")


def _with_value(prompt: str, key: str, shift: int) -> str:
    """The prompt with ``key``'s table value shifted by ``shift`` (mod 10)."""
    return re.sub(rf"(?<= ){key}=(\d)", lambda match: f"{key}={(int(match.group(1)) + shift) % 10}", prompt, count=1)


def test_answer_depends_on_prompt_facts_first_needed_late_and_only_on_looked_up_ones():
    late, changed, unused = 0, 0, 0
    for problem in toy.make_problems(30, seed=5, blocks=4, with_solution=True):
        keys = [key for _, key in lookups(problem["solution"])]
        first_seen_in_last_block = [k for i, k in enumerate(keys) if i >= 3 * STEPS_PER_BLOCK and k not in keys[:i]]
        if first_seen_in_last_block:
            late += 1
            altered = _with_value(problem["prompt"], first_seen_in_last_block[0], 1)
            changed += toy.solve(altered).endswith(f"answer: {problem['answer']}\n") is False
        for key in set(toy.task.LETTERS) - set(keys):
            unused += 1
            assert parse_answer(toy.solve(_with_value(problem["prompt"], key, 3))) == problem["answer"]
    assert late >= 5 and changed >= 0.95 * late, (late, changed)
    assert unused > 0, "some facts are never needed: the set that matters is small and identifiable"


def test_a_recent_window_of_ten_percent_misses_needed_facts():
    """Every problem has lookups whose value is last stated (in the prompt or an earlier step)
    more than 10% of the trace back: a sink + recent-window cache of that size has to guess them."""
    for problem in toy.make_problems(20, seed=6, with_solution=True):
        text, offset = problem["prompt"] + problem["solution"], len(problem["prompt"])
        window = 0.1 * len(problem["solution"])
        missed = 0
        for position, key in lookups(problem["solution"]):
            position += offset
            last_stated = max(match.start(1) for match in re.finditer(rf"(?<= ){key}=(\d)", text[:position]))
            missed += position - last_stated > window
        assert missed >= 10, missed


def test_model_path_points_at_the_bundled_directory_or_names_the_recipe():
    directory = toy.MODEL_DIR
    assert directory.parent == Path(toy.__file__).parent
    bundled = json.loads((directory / "tokenizer.json").read_text())
    assert bundled["model"]["vocab"] == toy.tokenizer.VOCAB
    assert AutoTokenizer.from_pretrained(directory).decode([1, 70, 71, 2], skip_special_tokens=True) == "ab"
    if (directory / "model.safetensors").exists():
        assert toy.model_path() == directory
    else:
        with pytest.raises(FileNotFoundError, match=r"recipes/train_toy_reasoner\.py"):
            toy.model_path()


def test_bundled_draft_is_a_2_layer_model_that_agrees_with_the_reasoner():
    """The draft `speculative_generate` benchmarks with: 2 layers, the reasoner's tokenizer, and
    the reasoner's next token on at least 95% of a reference chain of thought (teacher-forced)."""
    draft = AutoModelForCausalLM.from_pretrained(toy.draft_path()).eval()
    target = AutoModelForCausalLM.from_pretrained(toy.model_path()).eval()
    assert draft.config.num_hidden_layers == 2 and draft.config.vocab_size == target.config.vocab_size
    assert json.loads((toy.DRAFT_DIR / "tokenizer.json").read_text()) == json.loads(
        (toy.MODEL_DIR / "tokenizer.json").read_text()
    )
    problem = toy.make_problems(1, seed=5, blocks=1, with_solution=True)[0]
    ids = AutoTokenizer.from_pretrained(toy.model_path())(problem["prompt"] + problem["solution"],
                                                          return_tensors="pt").input_ids  # fmt: skip
    start = 1 + len(problem["prompt"])  # score the chain of thought, not the random prompt
    with torch.no_grad():
        agree = draft(ids).logits.argmax(-1)[0, start:] == target(ids).logits.argmax(-1)[0, start:]
    assert agree.float().mean() >= 0.95, f"draft agrees on {agree.float().mean():.3f} of the tokens"


def test_training_batches_are_reproducible_and_mask_the_prompt(recipe):
    batches = recipe.TrainBatches(seed=0, steps=100, tokens_per_step=8192, max_blocks=8, curriculum=0.5)
    assert [batches.blocks_limit(step) for step in (0, 25, 49, 50, 99)] == [2, 5, 8, 8, 8]
    batch = batches[7]
    assert torch.equal(batch["input_ids"], batches[7]["input_ids"])
    assert not torch.equal(batch["input_ids"][0], batches[8]["input_ids"][0])
    rows, length = batch["input_ids"].shape
    assert rows * length <= 8192 < (rows + 1) * length
    prompt_length = 1 + len(toy.make_problems(1, 0)[0]["prompt"])
    assert (batch["labels"][:, :prompt_length] == -100).all()
    assert torch.equal(batch["labels"][:, prompt_length:], batch["input_ids"][:, prompt_length:])
    assert (batch["input_ids"][:, -1] == toy.tokenizer.VOCAB[toy.tokenizer.EOS]).all()
    text = toy.build_tokenizer().decode(batch["input_ids"][0], skip_special_tokens=True)
    looked_up = [text[position - 1] for position in batch["lookups"][0].nonzero().flatten().tolist()]  # no <bos>
    assert looked_up == re.findall(r">[a-z] [a-z]=(\d)", text), "lookups marks the looked-up values"


def test_recipe_smoke_run_resumes_and_writes_loadable_files(recipe, tmp_path, capsys):
    out, checkpoint = tmp_path / "model", tmp_path / "checkpoint"
    common = ["--device", "cpu", "--smoke", "--layers", "1", "--out", str(out), "--checkpoint-dir", str(checkpoint)]
    recipe.main([*common, "--steps", "2", "--eval-problems", "0"])
    recipe.main([*common, "--steps", "3", "--resume"])
    log = capsys.readouterr().out
    assert "resumed at step 2" in log and "held-out greedy accuracy" in log
    assert recipe.load_checkpoint(checkpoint)["step"] == 3
    assert {path.name for path in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert all(path.stat().st_size < 16 * 2**20 for path in out.iterdir())
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.num_hidden_layers == 1  # --layers
    inputs = tokenizer([toy.make_problems(1, 0)[0]["prompt"]], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs.input_ids.shape[1] + 4)


class _Oracle(torch.nn.Module):
    """Stands in for a model in `evaluate`: "generates" the reference solution of each prompt."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        new = [
            [*self.tokenizer(toy.solve(prompt), add_special_tokens=False).input_ids, eos_token_id] for prompt in prompts
        ]
        width = max(map(len, new))
        assert width <= max_new_tokens
        new = torch.tensor([tokens + [pad_token_id] * (width - len(tokens)) for tokens in new])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_scores_reference_solutions_as_right(recipe, tokenizer):
    accuracy, per_length = recipe.evaluate(_Oracle(tokenizer), tokenizer, 6, seed=0, blocks=(1, 3), batch_size=4)
    assert accuracy == 1.0 and sum(len(right) for right in per_length.values()) == 6
