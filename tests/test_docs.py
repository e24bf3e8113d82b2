"""The README and docs/ say what the code does: commands, snippet, policies, defaults and links."""

import dataclasses
import os
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest

import longflow_patch

from test_eval_lm_eval import OFFLINE, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = [*sorted((REPO / "docs").rglob("*.md")), REPO / "README.md", REPO / "CHANGELOG.md", REPO / "examples/README.md"]


def _section(text: str, heading: str) -> str:
    """The body of the markdown section whose heading line is ``heading``, up to the next heading of
    the same or a higher level."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start:], flags=re.MULTILINE)
    return text[start : start + following.start()] if following else text[start:]


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_readme_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    functions = dict(re.findall(r"^(test_command|main_command)\(\) \{ (.*); \}$", ci, flags=re.MULTILINE))
    commands = [line for block in _code_blocks(README, "bash") for line in block.splitlines()]
    assert functions["main_command"] in commands
    assert functions["test_command"] in commands
    assert functions["main_command"] == "pip install -e . && python -m longflow_patch.demo"


def test_readme_snippet_runs_as_written(tmp_path):
    """The one-line-patch snippet, verbatim but for its checkpoint path: a tiny random Qwen3 whose
    every token ends the answer (so ``max_new_tokens=32768`` finishes at once), on this machine."""
    [snippet] = _code_blocks(_section(README, "## The one-line patch"), "python")
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    config = (checkpoint / "generation_config.json").read_text()
    (checkpoint / "generation_config.json").write_text(
        re.sub(r'"eos_token_id": \d+', f'"eos_token_id": {list(range(128))}', config)
    )
    line = re.search(r'^path = "[^"]+"', snippet, flags=re.MULTILINE)
    assert line, "the snippet names its checkpoint in one `path = ...` line"
    script = snippet.replace(line.group(0), f"path = {str(checkpoint)!r}")
    env = {**os.environ, **OFFLINE}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_readme_policy_table_lists_every_policy():
    rows = re.findall(r"^\| `(\w+)`", _section(README, "## Policies"), flags=re.MULTILINE)
    assert rows == list(longflow_patch.POLICIES)


def _documented_defaults(section: str) -> dict[str, str]:
    settings = re.search(r"\*\*Settings\*\*:\s(.*?)\*\*Compiles\*\*", section, flags=re.DOTALL)
    assert settings, "each policy section states its settings, then whether it compiles"
    return dict(re.findall(r"`(\w+)=([^`]+)`", settings.group(1)))


def test_policies_page_states_each_policy_and_its_defaults():
    page = (REPO / "docs" / "policies.md").read_text(encoding="utf-8")
    shared = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", _section(page, "## Shared settings"), flags=re.MULTILINE))
    for name, policy in longflow_patch.POLICIES.items():
        section = _section(page, f"## `{name}`")
        stated = shared | _documented_defaults(section)
        for field in dataclasses.fields(policy):
            if field.name == "budget":
                continue
            assert field.name in stated, f"docs/policies.md: {name} does not state {field.name}"
            assert stated[field.name] == repr(field.default), f"docs/policies.md: {name}.{field.name}"
        if not issubclass(policy, longflow_patch.ProfiledPolicy):
            compiles = policy(budget=256).compileable
            assert ("**Compiles**: yes" in section) == compiles, f"docs/policies.md: does {name} compile?"
        assert name == "full" or name == "random" or "https://arxiv.org/abs/" in section


@pytest.mark.parametrize("document", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_links_and_results_files_exist(document):
    text = document.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (document.parent / target).exists(), f"{document.name}: broken link {target}"
    for name in re.findall(r"bench/results/([\w./*-]+\w)", text):  # a name, or a glob of several
        assert any((REPO / "bench" / "results").glob(name)), f"{document.name}: no bench/results/{name}"


def test_version_is_the_changelog_head():
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(r"^## (\S+)", changelog, flags=re.MULTILINE).group(1) == longflow_patch.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", longflow_patch.__version__)


def test_help_reads_well():
    text = pydoc.render_doc(longflow_patch, renderer=pydoc.plaintext)
    assert "Patch a Llama, Qwen2 or Qwen3 model in place with one line" in text
    undocumented = [
        name
        for name in longflow_patch.__all__
        if callable(obj := getattr(longflow_patch, name)) and not (obj.__doc__ or "").strip()
    ]
    assert undocumented == []
