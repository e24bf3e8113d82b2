"""Budget profiles: the per-layer / per-head KV budgets of one model, saved as readable JSON.

A profile is what offline calibration produces and what the cache reads back. Units are KV entries:
one token kept by one KV head. ``layer_budgets[l]`` is the number of entries layer ``l`` holds summed
over its KV heads, ``head_budgets[l][h]`` the tokens KV head ``h`` of layer ``l`` keeps, and
``total_budget`` is the sum over all layers.

``reasonalloc``
    ``curves`` (optional) is ``[L][n]``: the utility of each layer with every KV head of it kept at
    ``0..n-1`` tokens (lengths may differ). Without ``head_budgets`` every head of layer ``l``
    starts at ``layer_budgets[l] / num_kv_heads`` (so it must divide evenly); online head
    re-allocation then moves slots between heads of a layer and keeps the layer's sum. Format 1
    stored a scalar need per layer instead; such files are refused (re-run the profiling recipe).
``lukv``
    ``head_budgets`` is required; ``curves`` (optional) is ``[L][H][n]``: the utility of each head at
    budgets ``0..n-1`` tokens (lengths may differ).

``minimum`` is the floor in tokens per KV head used by the solver (and checked on every budget).
``context_budget`` is the operating point the calibration describes: the slots every other KV head
kept while one head was measured (``recipes/profile_budgets.py``); None when not recorded. A
policy given several profiles of a method solves with the one measured nearest its budget.
``scorer`` is the token scorer the curves were measured under (``--scorer`` of that recipe, a name
in `longflow_patch.SCORERS`); None when not recorded. A policy allocates over its profile's scorer
unless told otherwise: budgets measured under one scorer can misfit another.

JSON schema: keys sorted, two-space indents, innermost number lists on one line. An ``lukv`` profile
(``reasonalloc`` ones have ``"head_budgets": null`` or a table, and ``curves`` of shape [L][n])::

    {
      "context_budget": 128,
      "curves": [
        [
          [0.0, 0.5, 0.7],
          [0.0, 0.9, 1.0]
        ]
      ],
      "format_version": 2,
      "head_budgets": [
        [2, 1]
      ],
      "layer_budgets": [3],
      "metadata": {
        "calibration": "4 prompts x 2048 tokens"
      },
      "method": "lukv",
      "minimum": 0,
      "model": "org/name",
      "num_kv_heads": 2,
      "num_layers": 1,
      "scorer": "rkv",
      "total_budget": 3
    }
"""

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from longflow_patch.allocation import greedy_allocate

FORMAT_VERSION = 2  # 2: ReasonAlloc curves are layer utility curves (format 1: a need per layer)
METHODS = ("reasonalloc", "lukv")
Method = Literal["reasonalloc", "lukv"]


def allocate(curves: list[list[float]], total: int, minimum: int) -> list[int]:
    """`greedy_allocate` of ``total`` over ``curves``; a total above what the curves span (a budget
    longer than the calibration sequences, past which every curve is flat: nothing more to keep)
    gives every curve its whole length and the rest evenly, the first curves taking the remainder."""
    most = sum(len(curve) - 1 for curve in curves)
    if total <= most:
        return greedy_allocate(curves, total, minimum)
    extra, count = divmod(total - most, len(curves))
    return [len(curve) - 1 + extra + (index < count) for index, curve in enumerate(curves)]


def reach(curve: list[float], budget: int) -> list[float]:
    """``curve`` extended flat (its last utility repeated) to cover ``budget``."""
    return curve + curve[-1:] * (budget + 1 - len(curve))


@dataclass(frozen=True)
class BudgetProfile:
    """Per-layer (and per-KV-head) budgets of one model; validated on construction.

    Attributes:
        method: ``"reasonalloc"`` or ``"lukv"``.
        model: the model's ``name_or_path`` or a summary of its config.
        num_layers: decoder layers.
        num_kv_heads: KV heads per layer.
        total_budget: KV entries over all layers and heads; ``sum(layer_budgets)``.
        layer_budgets: KV entries per layer, summed over its KV heads.
        head_budgets: tokens per layer per KV head (required for ``lukv``); rows sum to ``layer_budgets``.
        curves: calibration data to re-solve at another total (see the module docstring), or None.
        minimum: floor in tokens per KV head.
        metadata: calibration settings; JSON types only (tuples come back as lists).
        context_budget: slots every other KV head kept while the curves were measured, or None.
        scorer: the token scorer the curves were measured under, or None.
    """

    method: Method
    model: str
    num_layers: int
    num_kv_heads: int
    total_budget: int
    layer_budgets: list[int]
    head_budgets: list[list[int]] | None = None
    curves: list[Any] | None = None
    minimum: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    context_budget: int | None = None
    scorer: str | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_curves(
        cls,
        method: Method,
        model: str,
        curves: list[Any],
        total_budget: int,
        num_kv_heads: int,
        minimum: int = 0,
        metadata: dict[str, Any] | None = None,
        context_budget: int | None = None,
        scorer: str | None = None,
    ) -> "BudgetProfile":
        """Solve budgets from calibration data.

        ``lukv``: :func:`~longflow_patch.allocation.greedy_allocate` over all heads' curves with
        ``total_budget`` and floor ``minimum`` per head. ``reasonalloc``: the same solver over the
        layers' curves, in tokens per KV head (``total_budget / num_kv_heads``, which must be whole;
        floor ``minimum``), then times ``num_kv_heads``; no ``head_budgets`` (heads start even).
        A total past the curves' end (more than calibration measured, `allocate`) fills every curve
        and spreads the rest evenly; the curves are extended flat to cover it.
        """
        if method == "lukv":
            if any(len(layer) != num_kv_heads for layer in curves):
                raise ValueError(f"lukv curves must hold {num_kv_heads} curves per layer (one per KV head)")
            curves = [[np.asarray(curve, dtype=np.float64).tolist() for curve in layer] for layer in curves]
            flat = [curve for layer in curves for curve in layer]
            solved = allocate(flat, total_budget, minimum)
            heads = [solved[i : i + num_kv_heads] for i in range(0, len(solved), num_kv_heads)]
            curves = [[reach(curve, budget) for curve, budget in zip(*pair, strict=True)]
                      for pair in zip(curves, heads, strict=True)]  # fmt: skip
            layers = [sum(row) for row in heads]
            head_budgets: list[list[int]] | None = heads
        elif method == "reasonalloc":
            if num_kv_heads <= 0 or total_budget % num_kv_heads:
                raise ValueError(f"reasonalloc total_budget {total_budget} must be a multiple of num_kv_heads")
            curves = [np.asarray(curve, dtype=np.float64).tolist() for curve in curves]
            per_head = allocate(curves, total_budget // num_kv_heads, minimum)
            curves = [reach(curve, budget) for curve, budget in zip(curves, per_head, strict=True)]
            layers = [budget * num_kv_heads for budget in per_head]
            head_budgets = None
        else:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        return cls(
            method=method,
            model=model,
            num_layers=len(curves),
            num_kv_heads=num_kv_heads,
            total_budget=total_budget,
            layer_budgets=layers,
            head_budgets=head_budgets,
            curves=curves,
            minimum=minimum,
            metadata=dict(metadata or {}),
            context_budget=context_budget,
            scorer=scorer,
        )

    @classmethod
    def fixed(cls, table: list[list[int]], model: str, method: Method = "lukv") -> "BudgetProfile":
        """A profile that solves to exactly ``table`` (tokens per layer per KV head) at its total:
        each curve rises by one per slot up to its budget and ends there, so the greedy solver hands
        every head (``reasonalloc``: every layer, whose heads must then share one budget) its
        budget. A hand-set or drawn allocation then takes the real path (profile, solver, cache, op)."""
        if method == "reasonalloc":
            if any(len(set(row)) != 1 for row in table):
                raise ValueError("a reasonalloc table gives every KV head of a layer the same budget")
            curves: list[Any] = [list(range(row[0] + 1)) for row in table]
        else:
            curves = [[list(range(limit + 1)) for limit in row] for row in table]
        return cls.from_curves(method, model, curves, sum(map(sum, table)), len(table[0]))

    def rescale(self, total_budget: int, minimum: int | None = None) -> "BudgetProfile":
        """The same profile re-solved from its ``curves`` for another total (see :meth:`from_curves`),
        with floor ``minimum`` per head (default: the profile's own)."""
        if self.curves is None:
            raise ValueError("this profile stores no curves, so it cannot be re-solved at another total")
        minimum = self.minimum if minimum is None else minimum
        return self.from_curves(self.method, self.model, self.curves, total_budget, self.num_kv_heads,
                                minimum, self.metadata, self.context_budget, self.scorer)  # fmt: skip

    def head_budget_table(self) -> list[list[int]]:
        """Tokens per layer per KV head: ``head_budgets``, or each layer split evenly over its heads."""
        if self.head_budgets is not None:
            return [list(row) for row in self.head_budgets]
        return [[budget // self.num_kv_heads] * self.num_kv_heads for budget in self.layer_budgets]

    def to_json(self) -> str:
        """Readable JSON: sorted keys, innermost number lists on one line, exact float round-trip."""
        return _format({"format_version": FORMAT_VERSION, **asdict(self)}, 0) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "BudgetProfile":
        """Parse and validate :meth:`to_json` output; ValueError names the problem."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a budget profile must be a JSON object")
        version = data.pop("format_version", None)
        if version == 1 and data.get("method") == "reasonalloc":
            raise ValueError("format 1 ReasonAlloc profiles store a need per layer, format 2 a utility curve per "
                             "layer: re-run recipes/profile_budgets.py")  # fmt: skip
        if version not in (1, FORMAT_VERSION):  # format 1 LU-KV profiles read unchanged
            raise ValueError(f"unsupported format_version {version!r} (expected {FORMAT_VERSION})")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"missing keys {missing}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "BudgetProfile":
        """Read and validate a profile; errors name the file and the problem."""
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except ValueError as error:  # json.JSONDecodeError is a ValueError too
            raise ValueError(f"invalid budget profile {path}: {error}") from error


def _validate(profile: BudgetProfile) -> None:
    """Raise ValueError naming the first inconsistency in ``profile``."""
    if profile.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {profile.method!r}")
    if not isinstance(profile.model, str):
        raise ValueError(f"model must be a string, got {type(profile.model).__name__}")
    for name in ("num_layers", "num_kv_heads"):
        if not _is_int(getattr(profile, name)) or getattr(profile, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(profile, name)!r}")
    if not _is_int(profile.minimum) or profile.minimum < 0:
        raise ValueError(f"minimum must be a non-negative integer, got {profile.minimum!r}")
    if profile.context_budget is not None and (not _is_int(profile.context_budget) or profile.context_budget < 1):
        raise ValueError(f"context_budget must be a positive integer or null, got {profile.context_budget!r}")
    if profile.scorer is not None and (not isinstance(profile.scorer, str) or not profile.scorer):
        raise ValueError(f"scorer must be a scorer's name or null, got {profile.scorer!r}")
    if not _is_int(profile.total_budget):
        raise ValueError(f"total_budget must be an integer, got {profile.total_budget!r}")
    layers, heads = profile.num_layers, profile.num_kv_heads
    _check_budgets("layer_budgets", profile.layer_budgets, layers)
    if sum(profile.layer_budgets) != profile.total_budget:
        raise ValueError(
            f"layer_budgets sum to {sum(profile.layer_budgets)} but total_budget is {profile.total_budget}"
        )
    if profile.head_budgets is None:
        if profile.method == "lukv":
            raise ValueError("lukv profiles need head_budgets")
        uneven = [layer for layer, budget in enumerate(profile.layer_budgets) if budget % heads]
        if uneven:
            raise ValueError(f"layer_budgets of layers {uneven} do not split evenly over {heads} KV heads")
    else:
        if not isinstance(profile.head_budgets, list) or len(profile.head_budgets) != layers:
            raise ValueError(f"head_budgets must have {layers} rows (one per layer)")
        for layer, row in enumerate(profile.head_budgets):
            _check_budgets(f"head_budgets[{layer}]", row, heads)
            if sum(row) != profile.layer_budgets[layer]:
                raise ValueError(
                    f"head_budgets[{layer}] sums to {sum(row)} but layer_budgets[{layer}] is "
                    f"{profile.layer_budgets[layer]}"
                )
    below = [layer for layer, row in enumerate(profile.head_budget_table()) if min(row) < profile.minimum]
    if below:
        raise ValueError(f"layers {below} give a KV head fewer than minimum {profile.minimum} tokens")
    if profile.curves is not None:
        _check_curves(profile)
    if not isinstance(profile.metadata, dict) or not all(isinstance(key, str) for key in profile.metadata):
        raise ValueError("metadata must be a dict with string keys")


def _check_budgets(name: str, budgets: Any, length: int) -> None:
    """``budgets`` must be a list of ``length`` non-negative ints."""
    if not isinstance(budgets, list) or len(budgets) != length:
        raise ValueError(f"{name} must be a list of {length} integers")
    if not all(_is_int(b) and b >= 0 for b in budgets):
        raise ValueError(f"{name} must hold non-negative integers, got {budgets}")


def _check_curves(profile: BudgetProfile) -> None:
    """Curves shaped for the method, finite, and (lukv) long enough for every head budget."""
    curves, layers, heads = profile.curves, profile.num_layers, profile.num_kv_heads
    if not isinstance(curves, list) or len(curves) != layers:
        raise ValueError(f"curves must have {layers} entries (one per layer)")
    if profile.method == "reasonalloc":  # one curve per layer, in tokens per KV head
        for layer, (curve, budgets) in enumerate(zip(curves, profile.head_budget_table(), strict=True)):
            _check_curve(f"curves[{layer}]", curve, max(budgets), "its heads' budgets reach")
        return
    for layer, (row, budgets) in enumerate(zip(curves, profile.head_budgets or [], strict=True)):
        if not isinstance(row, list) or len(row) != heads:
            raise ValueError(f"curves[{layer}] must hold {heads} curves (one per KV head)")
        for h, (curve, budget) in enumerate(zip(row, budgets, strict=True)):
            _check_curve(f"curves[{layer}][{h}]", curve, budget, f"head_budgets[{layer}][{h}] is")


def _check_curve(name: str, curve: Any, budget: int, what: str) -> None:
    """``curve`` must be a non-empty list of finite numbers reaching at least ``budget``."""
    if not isinstance(curve, list) or not curve or not all(_is_number(u) for u in curve):
        raise ValueError(f"{name} must be a non-empty list of finite numbers")
    if budget > len(curve) - 1:
        raise ValueError(f"{name} covers budgets 0..{len(curve) - 1}, but {what} {budget}")


def _is_int(value: Any) -> bool:
    """A Python int (JSON-serialisable), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite Python int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _format(value: Any, depth: int) -> str:
    """JSON with sorted keys, two-space indents, and lists of scalars kept on one line."""
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(key)}: {_format(value[key], depth + 1)}" for key in sorted(value)]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list | tuple) and any(isinstance(item, dict | list | tuple) for item in value):
        items = [inner + _format(item, depth + 1) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(value, sort_keys=True, allow_nan=False)
