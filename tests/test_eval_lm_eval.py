"""lm-eval integration: the ``longflow_hf`` model, its start-up registration, the tasks, end to end.

Offline and on the CPU: a tiny random Qwen3 and a character-level tokenizer saved to a temporary
folder stand in for a real checkpoint.
"""

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from longflow_patch.eval import tasks_dir

from models import tiny_model

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "reasoning"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
REASONING_TASKS = ("aime24", "aime25", "amc", "math500", "gsm8k", "minerva", "olympiad")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# what a fresh interpreter reports about the registry: the start-up hook must have done its job
REGISTRY_CHECK = (
    "import sys; assert 'torch' not in sys.modules and 'longflow_patch' not in sys.modules; "
    "import lm_eval.models; from lm_eval.api.registry import model_registry as r; "
    "print(dict(r.items())['longflow_hf'], 'hf' in r)"
)


def save_tiny_checkpoint(path: Path) -> Path:
    """A tiny random Qwen3 (vocabulary 128) and a matching character-level tokenizer with a chat
    template, saved to ``path`` so that ``from_pretrained(path)`` loads them offline."""
    special = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0-3: tiny_model's pad, eos and bos ids
    vocab = {token: index for index, token in enumerate((*special, "\n", *map(chr, range(32, 127))))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tiny_model("qwen3").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def lm(checkpoint):
    from longflow_patch.eval.model import LongFlowLM

    return LongFlowLM(pretrained=str(checkpoint), budget=32, device="cpu", dtype="float32", batch_size=1)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **OFFLINE, **extra}


def _generate_request(context: str, max_gen_toks: int = 3):
    from lm_eval.api.instance import Instance

    return Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": max_gen_toks}), 0)


# -- registration ------------------------------------------------------------------------------
def test_pth_file_is_installed():
    line = next(
        (
            path.read_text()
            for folder in site.getsitepackages()
            if (path := Path(folder, "longflow_patch_lm_eval.pth")).is_file()
        ),
        None,
    )
    assert line is not None, "reinstall the package (pip install -e .) to install longflow_patch_lm_eval.pth"
    assert line.startswith("import ") and "'hook.py'" in line and line.count("\n") == 1  # one executed line


def test_startup_hook_registers_lazily_after_the_builtin_models():
    result = subprocess.run(
        [sys.executable, "-c", REGISTRY_CHECK], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["longflow_patch.eval.model:LongFlowLM", "True"]


@pytest.mark.parametrize(
    "launcher",
    [
        ["-m", "torch.distributed.run", "--nproc_per_node", "1", "--no-python"],
        ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--no_python"],
    ],
    ids=["torchrun", "accelerate"],
)
def test_startup_hook_works_under_launchers(launcher):
    command = [sys.executable, *launcher, sys.executable, "-c", REGISTRY_CHECK]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "longflow_patch.eval.model:LongFlowLM True" in result.stdout


def test_console_script_registers_explicitly(monkeypatch):
    import lm_eval.__main__
    import lm_eval.models
    from lm_eval.api.registry import get_model, model_registry

    from longflow_patch.eval import cli
    from longflow_patch.eval.model import LongFlowLM

    assert Path(sysconfig.get_path("scripts"), "longflow-lm-eval").is_file()
    monkeypatch.delitem(model_registry._objs, "longflow_hf", raising=False)  # as if the start-up hook had not run
    ran = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: ran.append(True))
    cli.main()
    assert ran == [True] and get_model("longflow_hf") is LongFlowLM and get_model("hf").__name__ == "HFLM"


# -- the model class ---------------------------------------------------------------------------
def test_model_args_are_cast_and_checked(checkpoint):
    import longflow_patch
    from longflow_patch.eval.model import LongFlowLM

    args = f"pretrained={checkpoint},policy=h2o,budget=40,per_head=true,sink_tokens=2,recent_window=6,max_gen_toks=99"
    lm = LongFlowLM.create_from_arg_string(args, {"device": "cpu"})
    policy = lm.model._longflow_policy
    assert isinstance(policy, longflow_patch.POLICIES["h2o"])
    assert (policy.budget, policy.per_head, policy.sink_tokens, policy.recent_window) == (40, True, 2, 6)
    assert lm.max_gen_toks == 99
    assert lm.get_model_info()["longflow"]["policy"] == "h2o"
    for bad in ("policy=nope", "buffer=16", "budget=many"):  # unknown policy; not a longflow setting; not a number
        with pytest.raises(ValueError):
            LongFlowLM.create_from_arg_string(f"pretrained={checkpoint},{bad}", {"device": "cpu"})


def test_default_generation_length_is_long(lm):
    assert lm.max_gen_toks == 32768


def test_loglikelihood_is_one_plain_forward(lm, checkpoint):
    from lm_eval.api.instance import Instance

    plain = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(lm._model_call(ids), plain(ids).logits)
    requests = [Instance("loglikelihood", {}, ("The answer is", " 42"), 0)]
    [(logprob, _)] = lm.loglikelihood(requests)
    assert logprob < 0 and torch.isfinite(torch.tensor(logprob))


def test_auto_batch_size_probes_generation(lm, monkeypatch):
    from longflow_patch.eval.model import PROBE_STEPS

    calls = []
    real_generate = lm.model.generate

    def generate(**kwargs):
        batch = kwargs["input_ids"].shape[0]
        if batch > 2:
            raise RuntimeError("CUDA out of memory. (simulated)")
        output = real_generate(**kwargs)
        calls.append((batch, kwargs["input_ids"].shape[1], kwargs["max_new_tokens"], output.shape[1]))
        return output

    monkeypatch.setattr(lm.model, "generate", generate)
    monkeypatch.setattr(lm, "max_batch_size", 4)
    requests = [_generate_request("a short prompt", 7), _generate_request("a longer prompt, this one", 5)]
    assert lm.generation_batch_size(requests) == 2  # 4 and 3 ran out of memory
    prompt_length = len(lm.tok_encode("a longer prompt, this one"))
    assert calls == [(2, prompt_length, 7, prompt_length + PROBE_STEPS)]


def test_auto_batch_size_generates(lm, monkeypatch):
    monkeypatch.setattr(lm, "batch_size_per_gpu", "auto")
    monkeypatch.setattr(lm, "max_batch_size", 2)
    outputs = lm.generate_until([_generate_request("one"), _generate_request("two"), _generate_request("three")])
    assert len(outputs) == 3 and all(isinstance(text, str) for text in outputs)
    assert lm.batch_size_per_gpu == "auto"


# -- tasks ------------------------------------------------------------------------------------
def test_toy_task(lm):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from longflow_patch import toy

    manager = TaskManager(include_path=tasks_dir(), include_defaults=False, metadata={"toy_problems": 3})
    results = simple_evaluate(
        model=lm, tasks=["longflow_toy"], task_manager=manager, limit=2, gen_kwargs="max_gen_toks=4"
    )
    assert results["results"]["longflow_toy"]["exact_match,none"] == 0.0  # a random model does not solve it
    task = manager.load(["longflow_toy"])["tasks"]["longflow_toy"]
    problem = toy.make_problems(1, 0, with_solution=True)[0]
    assert task.process_results(problem, [problem["solution"]]) == {"exact_match": 1.0}
    assert task.doc_to_text(problem) == problem["prompt"]


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"no local reasoning data at {DATA_DIR}")
def test_cli_end_to_end(checkpoint, tmp_path):
    """``python -m lm_eval --model longflow_hf``: registration by the .pth hook, the reasoning group
    read from local files, the chat template, ``batch_size=auto`` and results on disk."""
    command = [
        sys.executable, "-m", "lm_eval",
        "--model", "longflow_hf",
        "--model_args", f"pretrained={checkpoint},budget=32,dtype=float32",
        "--tasks", "longflow_reasoning",
        "--include_path", tasks_dir(),
        "--metadata", f"data_dir={DATA_DIR}",
        "--apply_chat_template",
        "--gen_kwargs", "max_gen_toks=2",
        "--limit", "1",
        "--device", "cpu",
        "--batch_size", "auto", "--max_batch_size", "2",
        "--log_samples", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    env = _env()
    env.pop("LONGFLOW_DATA_DIR", None)  # the data location comes from --metadata here
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "longflow_hf"
    assert results["config"]["longflow"]["budget"] == 32
    assert "exact_match,none" in results["groups"]["longflow_reasoning"]
    for name in REASONING_TASKS:
        assert results["results"][f"longflow_{name}"]["exact_match,none"] in (0.0, 1.0)
    [samples_file] = (tmp_path / "out").rglob("samples_longflow_math500_*.jsonl")
    sample = json.loads(samples_file.read_text().splitlines()[0])
    prompt, generation_kwargs = sample["arguments"]["gen_args_0"].values()
    assert prompt.startswith("<|user|>") and prompt.endswith("\\boxed{}.\n<|assistant|>")
    assert generation_kwargs == {"until": [], "do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_gen_toks": 2}
    assert sample["target"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_tasks_ship_with_the_package():
    names = {path.name for path in Path(tasks_dir()).iterdir()}
    assert {f"longflow_{name}.yaml" for name in (*REASONING_TASKS, "reasoning", "toy")} <= names
    assert {"_reasoning_template_yaml", "utils.py", "README.md"} <= names


def test_data_parallel_run_matches_one_process(tmp_path):
    """``accelerate launch -m lm_eval --model longflow_hf`` with two CPU processes: each process
    generates for its share of the problems and rank 0 gathers them, so the score and every
    generation equal one process's. The bundled toy reasoner on four one-block problems (about
    650 tokens of chain of thought each), which it solves, so the score compared is not a 0."""
    from longflow_patch import toy

    def run(launcher: list[str], out: Path) -> tuple[float, dict[int, str]]:
        command = [
            *launcher, "-m", "lm_eval",
            "--model", "longflow_hf",
            "--model_args", f"pretrained={toy.model_path()},policy=longflow,budget=1024,dtype=float32",
            "--tasks", "longflow_toy",
            "--include_path", tasks_dir(),
            "--metadata", "toy_problems=4,toy_blocks=1",
            "--device", "cpu", "--batch_size", "2",
            "--log_samples", "--output_path", str(out),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        [results_file] = out.rglob("results_*.json")
        [samples_file] = out.rglob("samples_longflow_toy_*.jsonl")
        samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
        score = json.loads(results_file.read_text())["results"]["longflow_toy"]["exact_match,none"]
        return score, {sample["doc_id"]: sample["resps"][0][0] for sample in samples}

    one_score, one_generations = run([sys.executable], tmp_path / "one")
    two_score, two_generations = run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"], tmp_path / "two"
    )
    assert one_score == 1.0
    assert two_score == one_score
    assert sorted(two_generations) == [0, 1, 2, 3]
    assert two_generations == one_generations
