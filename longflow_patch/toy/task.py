"""The toy reasoning task: a table walk whose chain of thought needs facts from far back.

A problem is a table giving each of the 26 letters a digit (listed in random order), a number of
blocks and two start digits. The prompt (130 characters)::

    vars: q=3 f=7 ... c=5
    blocks: 3 start: 4 7

The chain of thought walks ``STEPS_PER_BLOCK`` steps per block, one line per step ``t`` over two
digit registers ``a`` and ``b`` (initially the start digits)::

    049 81+4+6=91>n n=5 3+5=8 6+8=4

which reads: units(t)^2 + tens(t) + a = 91, so the key is the letter at 91 mod 26 = 13 (local
arithmetic); its value is 5 (a fact from the prompt table, or from the last line that looked the
same key up, often hundreds or thousands of tokens back); b = b + 5 mod 10 = 8 and a = a + b mod
10 = 4 (local arithmetic). For a given table and step, (a, b) -> (a', b') is a bijection, so a
wrong digit anywhere changes every later state: errors never heal. After block k the results so
far are restated, ``R1=47 R2=05`` (R_k is "ab" after block k, the earlier ones recalled from the
previous restatement, one block back), and the last line is the answer, every block's result:
``answer: 4705...``.

A step line is 32 characters, and all problems of B blocks have the same length:
642 * B + 3 * B * (B + 1) + 9 characters of chain of thought.
"""

import random
import re
import string
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
STEPS_PER_BLOCK = 20
MAX_BLOCKS = 9
DEFAULT_BLOCKS = (2, 6)

_PROMPT = re.compile(r"vars: ((?:[a-z]=\d )*[a-z]=\d)\nblocks: (\d) start: (\d) (\d)\n")
_ANSWER = re.compile(r"answer: *(\d+)")


@dataclass(frozen=True)
class Problem:
    """One problem. ``table`` maps each letter to its digit, in the order the prompt lists them."""

    table: dict[str, int]
    blocks: int
    start: tuple[int, int]

    def prompt(self) -> str:
        entries = " ".join(f"{key}={value}" for key, value in self.table.items())
        return f"vars: {entries}\nblocks: {self.blocks} start: {self.start[0]} {self.start[1]}\n"

    def solution(self) -> str:
        """The reference chain of thought, ending with the answer line (and a newline)."""
        (a, b), results, lines = self.start, [], []
        for step in range(1, self.blocks * STEPS_PER_BLOCK + 1):
            square, tens = (step % 10) ** 2, step // 10 % 10
            index = square + tens + a
            key = LETTERS[index % len(LETTERS)]
            value = self.table[key]
            new_b = (b + value) % 10
            new_a = (a + new_b) % 10
            lookup = f"{square:02d}+{tens}+{a}={index:02d}>{key} {key}={value}"
            lines.append(f"{step:03d} {lookup} {b}+{value}={new_b} {a}+{new_b}={new_a}")
            a, b = new_a, new_b
            if step % STEPS_PER_BLOCK == 0:
                results.append(f"{a}{b}")
                lines.append(" ".join(f"R{block}={result}" for block, result in enumerate(results, 1)))
        lines.append(f"answer: {''.join(results)}")
        return "\n".join(lines) + "\n"


def parse_prompt(prompt: str) -> Problem:
    """The problem a prompt states; ``ValueError`` if it is not one."""
    match = _PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not a toy-task prompt: {prompt[:80]!r}")
    table = {entry[0]: int(entry[2]) for entry in match.group(1).split(" ")}
    if sorted(table) != list(LETTERS):
        raise ValueError("the table must list every letter exactly once")
    return Problem(table, int(match.group(2)), (int(match.group(3)), int(match.group(4))))


def solve(prompt: str) -> str:
    """The reference chain of thought for a prompt."""
    return parse_prompt(prompt).solution()


def random_problem(rng: random.Random, blocks: int | tuple[int, int] = DEFAULT_BLOCKS) -> Problem:
    """A problem drawn from ``rng``; ``blocks`` is a count or an inclusive (low, high) range."""
    low, high = (blocks, blocks) if isinstance(blocks, int) else blocks
    if not 1 <= low <= high <= MAX_BLOCKS:
        raise ValueError(f"blocks must lie in 1..{MAX_BLOCKS}, got {blocks}")
    count = rng.randint(low, high)
    table = {key: rng.randrange(10) for key in rng.sample(LETTERS, len(LETTERS))}
    return Problem(table, count, (rng.randrange(10), rng.randrange(10)))


def make_problems(
    n: int,
    seed: int | str,
    *,
    blocks: int | tuple[int, int] = DEFAULT_BLOCKS,
    with_solution: bool = False,
) -> list[dict[str, str]]:
    """``n`` problems as ``{"prompt", "answer"}`` dicts (plus ``"solution"``, the reference chain
    of thought, if ``with_solution``), the same for the same arguments.

    ``blocks`` (a count or an inclusive range, 1..9) sets the length: 20 steps and about 650
    tokens of chain of thought per block; the default gives 1.3k-3.9k. Integer seeds are for
    evaluation: the training recipe draws its problems from string seeds, so it never trains on
    an integer-seeded problem.
    """
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        problem = random_problem(rng, blocks)
        solution = problem.solution()
        item = {"prompt": problem.prompt(), "answer": parse_answer(solution)}
        if with_solution:
            item["solution"] = solution
        problems.append(item)
    return problems


def parse_answer(completion: str) -> str | None:
    """The digits of the last ``answer:`` line, or None if there is none or it is malformed."""
    lines = [line for line in completion.splitlines() if line.startswith("answer:")]
    if not lines:
        return None
    match = _ANSWER.fullmatch(lines[-1].rstrip())
    return match.group(1) if match else None


def blocks_solved(completion: str, answer: str) -> float:
    """Fraction of the problem's blocks whose results the completion's answer gets right, counted
    from the first block up to the first wrong one (a wrong digit corrupts every later state, so
    later matches are chance): partial credit that still separates runs when few are fully right."""
    expected = answer.strip()
    stated = parse_answer(completion) or ""
    blocks = len(expected) // 2
    solved = 0
    while solved < blocks and stated[2 * solved : 2 * solved + 2] == expected[2 * solved : 2 * solved + 2]:
        solved += 1
    return solved / blocks


def is_correct(completion: str, answer: str) -> bool:
    """Whether the completion's final answer line states ``answer``."""
    return parse_answer(completion) == answer.strip()
