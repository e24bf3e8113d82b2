r"""Grading math answers: the last ``\boxed{...}`` of a completion against a reference answer.

`score` is what the reasoning tasks report. Answers are compared by mathematical equivalence,
not string equality: ``\dfrac{1}{2}``, ``0.5`` and ``1/2`` agree, as do ``\left( 3, \frac{\pi}{2}
\right)`` and ``(3,\frac{\pi}{2})``, ``1,000`` and ``1000``, ``90^\circ`` and ``90``, ``x = 5`` and
``5``, ``2\sqrt{2}`` and ``\sqrt{8}``. Grading is deterministic and needs no timeout: numbers are
compared exactly (as fractions; non-integers within a relative 1e-4), and sympy, when installed,
only evaluates short allowlisted expressions numerically at fixed points, with exponents bounded.
"""

import math
import re
from fractions import Fraction

_BOXED = ("\\boxed", "\\fbox")
_UNWRAPPED = ("\\boxed", "\\text", "\\textbf", "\\textit", "\\textnormal", "\\mathrm", "\\mathbf", "\\mbox")
_DELETED = (
    "\n", "\\displaystyle", "\\qquad", "\\quad", "\\!", "\\,", "\\;", "\\:", "\\ ", "~",
    "\\$", "$", "\\%", "%", "°", "\\degree",
)  # fmt: skip
_SIZING = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])\.?")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ")
_UNIT = re.compile(r"^(.+?)\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]+\}$")
_VARIABLE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+")
_SCIENTIFIC = re.compile(r"(\d)(?:\\times|\\cdot|\*)10\^\{?([-+]?\d+)\}?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_RELATIVE_TOLERANCE = 1e-4
_MAX_EXPONENT = 10**5


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``, or ``\boxed 5``) in ``text``.

    Braces are matched, so ``\boxed{\frac{3}{2}}`` gives ``\frac{3}{2}``. None when there is no box
    or the last one is never closed (a truncated completion earns nothing).
    """
    start = max(text.rfind(command) for command in _BOXED)
    if start < 0:
        return None
    rest = text[start + len(next(c for c in _BOXED if text.startswith(c, start))) :]
    if rest.lstrip().startswith("{"):
        content = _group(rest.lstrip(), 0)
        return None if content is None else content[0].strip()
    if rest[:1].isspace():
        token = re.match(r"\s*([^\s$]+)", rest)
        return token[1] if token else None
    return None


def clean_reference(reference: str) -> str:
    r"""A dataset's reference answer, repaired where it was cut from its solution by a regex that
    does not nest braces (``3} \pmod{7`` for ``\boxed{3} \pmod{7}``): cut at the first unmatched ``}``."""
    depth = 0
    for index, char in _unescaped(reference):
        if char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return reference[:index].strip()
            depth -= 1
    return reference.strip()


def normalize(answer: str) -> str:
    """Canonical spelling of an answer: layout, units, degrees, dollars, prefixes and spaces dropped."""
    text = answer.strip()
    if unit := _UNIT.match(text):
        text = unit[1]
    for command in _UNWRAPPED:
        text = _unwrap(text, command)
    text = _DEGREES.sub("", _SIZING.sub("", text))
    for token in _DELETED:
        text = text.replace(token, "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\{", "{").replace("\\}", "}")
    if text.count("=") == 1 and _VARIABLE.fullmatch(text.split("=")[0].strip()):
        text = text.split("=")[1]
    text = text.replace(" ", "").rstrip(".")
    text = _SCIENTIFIC.sub(r"\1e\2", text)
    text = re.sub(r"\\(frac|sqrt)(\\[a-zA-Z]+|[0-9a-zA-Z])", r"\\\1{\2}", text)  # \frac12, \sqrt2, \frac\pi2
    text = re.sub(r"(\\frac\{[^{}]*\})(\\[a-zA-Z]+|[0-9a-zA-Z])", r"\1{\2}", text)  # \frac{1}2
    text = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", text)  # .5
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if fraction := re.fullmatch(r"(-?\d+)/(\d+)", text):
        text = f"\\frac{{{fraction[1]}}}{{{fraction[2]}}}"
    return text


def is_equiv(prediction: str | None, reference: str) -> bool:
    """Whether ``prediction`` (an extracted answer) is mathematically the reference answer."""
    if prediction is None:
        return False
    return _equal(normalize(prediction), normalize(clean_reference(reference)))


def score(completion: str, reference: str) -> bool:
    r"""Whether the last ``\boxed{...}`` of ``completion`` is equivalent to ``reference``."""
    return is_equiv(last_boxed(completion), reference)


# -- comparison ---------------------------------------------------------------------------------
def _equal(a: str, b: str) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    number_a, number_b = _number(a), _number(b)
    if number_a is not None and number_b is not None:
        return _close(number_a, number_b)
    (open_a, items_a, close_a), (open_b, items_b, close_b) = _items(a), _items(b)
    same_brackets = (open_a, close_a) == (open_b, close_b)
    if len(items_a) > 1 or len(items_b) > 1:
        if not same_brackets or len(items_a) != len(items_b):
            return False
        if open_a in ("(", "["):  # tuples and intervals: in order
            return all(_equal(x, y) for x, y in zip(items_a, items_b, strict=True))
        return _same_items(items_a, items_b)  # sets and lists of answers: any order
    if open_a and same_brackets:
        return _equal(items_a[0], items_b[0])
    return _symbolic_equal(a, b)


def _close(a: Fraction | complex, b: Fraction | complex) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction) and a.denominator == b.denominator == 1:
        return a == b  # integers: exactly
    if not all(map(math.isfinite, (abs(a), abs(b)))):
        return False
    return abs(a - b) <= _RELATIVE_TOLERANCE * max(abs(a), abs(b))


def _same_items(items_a: list[str], items_b: list[str]) -> bool:
    unmatched = list(items_b)
    for item in items_a:
        match = next((other for other in unmatched if _equal(item, other)), None)
        if match is None:
            return False
        unmatched.remove(match)
    return True


def _number(text: str) -> Fraction | None:
    r"""Exact value of a plain number: integer, decimal, ``4.4e7``, ``\frac{a}{b}``, ``a^{n}``."""
    sign = -1 if text.startswith("-") else 1
    body = text[1:] if sign < 0 else text
    if re.fullmatch(r"\d+(?:\.\d*)?(?:e[-+]?\d+)?|\.\d+(?:e[-+]?\d+)?", body):
        return sign * Fraction(body)
    if body.startswith("\\frac{"):
        numerator = _group(body, len("\\frac"))
        denominator = numerator and _group(body, numerator[1])
        if denominator and denominator[1] == len(body):
            top, bottom = _number(numerator[0]), _number(denominator[0])
            if top is not None and bottom:
                return sign * top / bottom
    if power := re.fullmatch(r"(\d+)\^\{?(-?\d{1,3})\}?", body):
        return sign * Fraction(int(power[1])) ** int(power[2])
    return None


def _items(text: str) -> tuple[str, list[str], str]:
    """``(opening bracket, comma-separated items, closing bracket)``; brackets empty if not enclosed."""
    opening = closing = ""
    if text[0] in "([{" and text[-1] in ")]}" and _enclosing(text):
        opening, closing, text = text[0], text[-1], text[1:-1]
    items, depth, start = [], 0, 0
    for index, char in _unescaped(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    return opening, [*items, text[start:]], closing


def _enclosing(text: str) -> bool:
    """Whether the first character's bracket closes at the last character."""
    depth = 0
    for index, char in _unescaped(text):
        depth += (char in "([{") - (char in ")]}")
        if depth == 0:
            return index == len(text) - 1
    return False


# -- LaTeX helpers ------------------------------------------------------------------------------
def _unescaped(text: str):
    """``(index, char)`` for each character not escaped by a backslash (``\\{`` is a literal brace)."""
    index = 0
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        yield index, text[index]
        index += 1


def _group(text: str, start: int) -> tuple[str, int] | None:
    """The ``{...}`` group opening at ``text[start]`` (after spaces): ``(content, index after it)``."""
    while start < len(text) and text[start].isspace():
        start += 1
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for index, char in _unescaped(text[start:]):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return text[start + 1 : start + index], start + index + 1
    return None


def _unwrap(text: str, command: str) -> str:
    r"""``\command{x}`` -> ``x`` everywhere (``\text{cm}`` -> ``cm``)."""
    pattern = re.compile(re.escape(command) + r"(?![a-zA-Z])")
    while match := pattern.search(text):
        group = _group(text, match.end())
        if group is None:
            return text
        text = text[: match.start()] + group[0] + text[group[1] :]
    return text


# -- symbolic fallback (sympy, optional) --------------------------------------------------------
_FUNCTIONS = ("sqrt", "log", "sin", "cos", "tan", "exp", "pi", "oo")
_PARSER_NAMES = ("Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow")  # what parse_expr's code calls
_LATEX_WORDS = {
    "\\cdot": "*", "\\times": "*", "\\pi": " pi ", "\\infty": " oo ", "\\ln": " log", "\\log": " log",
    "\\sin": " sin", "\\cos": " cos", "\\tan": " tan", "\\exp": " exp",
}  # fmt: skip
# Two fixed points per variable: the comparison needs no randomness and no simplification.
_POINTS = ((0.5772156649, 1.2020569032, 2.6854520010), (1.6180339887, 0.9159655942, 1.4142135624))


def _symbolic_equal(a: str, b: str) -> bool:
    """Numerical agreement of two expressions at fixed points; False whenever either is not a
    short, allowlisted expression or sympy is not installed."""
    try:
        import sympy
        from sympy.parsing.sympy_parser import implicit_multiplication, parse_expr, standard_transformations
    except ImportError:
        return False
    expressions = []
    for text in (a, b):
        code = _python_expression(text)
        if code is None:
            return False
        try:
            expression = parse_expr(
                code,
                local_dict={name: getattr(sympy, name) for name in _FUNCTIONS} | {"e": sympy.E, "i": sympy.I},
                global_dict={"__builtins__": {}} | {name: getattr(sympy, name) for name in _PARSER_NAMES},
                transformations=(*standard_transformations, implicit_multiplication),
                evaluate=False,
            )
        except Exception:
            return False
        if not _bounded(expression, sympy):
            return False
        expressions.append(expression)
    symbols = sorted(expressions[0].free_symbols | expressions[1].free_symbols, key=str)
    if len(symbols) > len(_POINTS[0]):
        return False
    try:
        for point in _POINTS:
            values = dict(zip(symbols, point, strict=False))
            a_value, b_value = (complex(e.evalf(30, subs=values)) for e in expressions)
            if not _close(a_value, b_value):
                return False
    except (TypeError, ValueError, ArithmeticError):
        return False
    return True


def _python_expression(text: str) -> str | None:
    """``text`` as a sympy-parsable expression of allowlisted names only, or None."""
    if len(text) > 200 or "," in text:
        return None
    text = _latex_call(text, "\\frac", 2, "(({0})/({1}))")
    text = re.sub(r"\\sqrt\[([^\[\]]+)\]", r"\\root{\1}", text)
    text = _latex_call(text, "\\root", 2, "(({1})**(1/({0})))")
    text = _latex_call(text, "\\sqrt", 1, "sqrt({0})")
    for word, replacement in _LATEX_WORDS.items():
        text = re.sub(re.escape(word) + r"(?![a-zA-Z])", replacement, text)
    text = text.replace("^", "**").replace("{", "(").replace("}", ")")
    if not re.fullmatch(r"[0-9A-Za-z+\-*/(). ]*", text):
        return None
    for name in re.findall(r"[A-Za-z]+", text):
        if len(name) > 1 and name not in _FUNCTIONS:
            return None  # an unknown word (text, or a Python name): not an expression
    return text


def _latex_call(text: str, command: str, arity: int, template: str) -> str:
    r"""Rewrite ``\command{a}{b}`` with ``template`` (innermost first, so nesting works)."""
    pattern = re.compile(re.escape(command) + r"(?![a-zA-Z])")
    for match in reversed(list(pattern.finditer(text))):
        arguments, end = [], match.end()
        for _ in range(arity):
            group = _group(text, end)
            if group is None:
                break
            arguments.append(group[0])
            end = group[1]
        else:
            text = text[: match.start()] + template.format(*arguments) + text[end:]
    return text


def _bounded(expression, sympy) -> bool:
    """Whether every constant exponent is at most ``_MAX_EXPONENT`` in size (innermost first), so
    that evaluating it is quick: power towers such as ``2^{2^{2^{20}}}`` are refused."""
    for node in sympy.postorder_traversal(expression):
        if isinstance(node, sympy.Pow) and not node.exp.free_symbols:
            try:
                if abs(complex(node.exp.evalf(15))) > _MAX_EXPONENT:
                    return False
            except (TypeError, ValueError, ArithmeticError):
                return False
    return True
