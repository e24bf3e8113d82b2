r"""Answer extraction (the last brace-balanced ``\boxed{}``) and math-equivalence scoring, on hand-made
cases and on the real benchmark rows in ``../shared/data/reasoning/`` (skipped where absent)."""

import json
import re
import sys
import time
from pathlib import Path

import pytest

from longflow_patch.eval.grading import clean_reference, is_equiv, last_boxed, normalize, score
from longflow_patch.eval.tasks import utils

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "reasoning"
BENCHMARKS = ("aime24", "aime25", "amc", "math", "gsm8k", "minerva", "olympiad")
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"no local reasoning data at {DATA_DIR}")


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / f"{name}.jsonl").read_text().splitlines() if line]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"so the answer is $\boxed{\frac{3}{2}}$.", r"\frac{3}{2}"),
        (r"first \boxed{1}, then \boxed{\left(3,\frac{\pi}{2}\right)}", r"\left(3,\frac{\pi}{2}\right)"),
        (r"\boxed{\frac{\sqrt{21}}{5}}", r"\frac{\sqrt{21}}{5}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not grouping braces
        (r"\boxed{\boxed{7}}", "7"),
        (r"\boxed {12}", "12"),
        (r"\boxed 5$", "5"),
        (r"\fbox{x^{2}}", "x^{2}"),
        (r"\boxed{4} wait, actually \boxed{\frac{1", None),  # cut off: the last box is unfinished
        ("no box at all: 42", None),
    ],
)
def test_last_boxed(completion, expected):
    assert last_boxed(completion) == expected


def test_nested_braces_defeat_a_plain_regex():
    completion = r"Hence $\boxed{\frac{3}{2}}$."
    assert re.search(r"\\boxed{(.*?)}", completion)[1] == r"\frac{3"  # what a non-nesting regex scores
    assert score(completion, "1.5") and score(completion, r"\dfrac{3}{2}")


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac{1}{2}", "1/2"),
        (r"\frac12", r"\tfrac{1}{2}"),
        (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
        ("1,000", "1000"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90°"),
        ("x = 5", "5"),
        (r"\$18.00", "18"),
        ("18\\%", "18"),
        ("5.", "5"),
        ("023", "23"),
        ("36", "36.0"),
        (r"10\text{ cm}", "10"),
        (r"4.4 \times 10^{7}", "4.4e7"),
        ("10^{11}", "1e11"),
        ("-.5", r"-\frac{1}{2}"),
        (r"\frac{-1}{2}", "-0.5"),
        (r"3\!\cdot\!10", "30"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("-q + p", "p - q"),
        ("(x+1)^2", "x^2+2x+1"),
        (r"\frac{1}{5}\sqrt{21}", r"\frac{\sqrt{21}}{5}"),
        ("(3,2), (1,1)", "$(1,1), (3,2)$"),
        ("60, 90", r"$90^{\circ}$,$60^{\circ}$"),
        (r"\{2,1\}", r"\{1,2\}"),
        (r"\left[ 1, 2 \right)", "[1,2)"),
        (r"\frac{9}{32}\sqrt{2}", r"$M=\frac{9}{32} \sqrt{2}$"),
    ],
)
def test_equivalent(prediction, reference):
    assert is_equiv(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("109900", "109890"),  # integers compare exactly, not within a tolerance
        ("0.33", r"\frac{1}{3}"),
        ("(1,2)", "[1,2]"),
        ("(2,3)", "(3,2)"),  # tuples are ordered
        ("x^2+2x+2", "(x+1)^2"),
        ("Monday", "Tuesday"),
        (r"2^{2^{2^{20}}}", "5"),  # refused, not evaluated for ever
        ("__import__('os').system('true')", "0"),  # never evaluated
        (None, "5"),
        ("", "5"),
    ],
)
def test_not_equivalent(prediction, reference):
    started = time.perf_counter()
    assert not is_equiv(prediction, reference)
    assert time.perf_counter() - started < 5


def test_without_sympy_numbers_still_compare(monkeypatch):
    assert is_equiv(r"2\sqrt{2}", r"\sqrt{8}")
    monkeypatch.setitem(sys.modules, "sympy", None)  # import sympy now raises ImportError
    assert not is_equiv(r"2\sqrt{2}", r"\sqrt{8}")
    assert is_equiv("0.5", r"\dfrac{1}{2}") and is_equiv(r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})")


def test_normalize():
    assert normalize(r" \left( 3, \dfrac{\pi}{2} \right) ") == r"(3,\frac{\pi}{2})"
    assert normalize(r"$x = 1,000$.") == "1000"
    assert normalize(r"\text{(C)}") == "(C)"


@needs_data
@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_reference_scores_against_itself(name):
    for row in rows(name):
        reference = row["true_answer"]
        answer = clean_reference(reference)
        assert score(f"Reasoning...\nThus the answer is $\\boxed{{{answer}}}$.", reference), reference
        assert not score(r"\boxed{123456789}", reference), reference
        assert not score("I give up.", reference)


@needs_data
def test_real_rows_with_nested_braces():
    math = {row["index"]: row["true_answer"] for row in rows("math")}
    assert math[0] == r"\left( 3, \frac{\pi}{2} \right)"
    assert score(r"The polar form is $\boxed{\left(3, \dfrac{\pi}{2}\right)}$", math[0])
    assert score(r"\boxed{(3,\frac\pi2)}", math[0])
    assert not score(r"\boxed{\left(3, \frac{\pi}{3}\right)}", math[0])
    nested = [answer for answer in math.values() if re.search(r"\\frac\{[^{}]*\{", answer)]
    assert nested  # references such as \frac{\sqrt{21}}{5}
    for answer in nested:
        assert score(f"\\boxed{{{answer.replace(chr(92) + 'frac', chr(92) + 'dfrac')}}}", answer), answer


@needs_data
def test_references_cut_by_a_non_nesting_regex_are_repaired():
    """Six MATH-500 references end in ``\\pmod{n`` (cut out of ``\\boxed{3} \\pmod{7}``)."""
    math = {row["index"]: row["true_answer"] for row in rows("math")}
    intended = {35: "3", 130: "13", 415: "9", 448: "44", 457: "0", 487: "2"}
    for index, answer in intended.items():
        assert "pmod" in math[index] and clean_reference(math[index]) == answer
        assert score(f"\\boxed{{{answer}}}", math[index])
        assert not score(f"\\boxed{{{int(answer) + 1}}}", math[index])


@needs_data
def test_olympiad_multiple_answers_in_any_order():
    olympiad = [row["true_answer"] for row in rows("olympiad")]
    reference = next(answer for answer in olympiad if answer == "$(1,1), (3,2)$")
    assert score(r"\boxed{(3, 2), (1, 1)}", reference)
    assert not score(r"\boxed{(1, 1)}", reference)


@needs_data
def test_reasoning_loader(monkeypatch):
    monkeypatch.delenv(utils.DATA_DIR_VARIABLE, raising=False)
    with pytest.raises(FileNotFoundError, match="LONGFLOW_DATA_DIR"):
        utils.load_reasoning("aime24.jsonl")
    dataset = utils.load_reasoning("aime24.jsonl", data_dir=str(DATA_DIR), version=1.0, pretrained="ignored")["test"]
    assert len(dataset) == 30 and set(dataset.column_names) == {"index", "question", "true_answer"}
    monkeypatch.setenv(utils.DATA_DIR_VARIABLE, str(DATA_DIR))
    doc = utils.load_reasoning("gsm8k.jsonl")["test"][0]
    prompt = utils.reasoning_prompt(doc)
    assert prompt.startswith(doc["question"]) and prompt.endswith(r"within \boxed{}.")
    assert utils.process_reasoning(doc, [rf"... so \boxed{{{doc['true_answer']}}}"]) == {"exact_match": 1.0}
    assert utils.process_reasoning(doc, ["no answer"]) == {"exact_match": 0.0}
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        utils.load_reasoning("missing.jsonl")
