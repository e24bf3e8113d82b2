"""Policy settings that arrive as text (lm-eval ``model_args``, command lines), cast to their types.

The settings a policy takes are the fields of its dataclass (`longflow_patch.POLICIES`), so new
policies and settings need no change here.
"""

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Mapping

from longflow_patch.policies import POLICIES, check_policy_name, check_settings, unknown_setting_message

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def setting_names() -> set[str]:
    """Every setting of any registered policy (``budget``, ``sink_tokens``, ``buffer``, ...)."""
    return {field.name for policy in POLICIES.values() for field in dataclasses.fields(policy)}


def policy_options(policy: str, raw: Mapping[str, object]) -> dict[str, object]:
    """``raw`` settings for ``policy``, each cast to the type of the policy's field.

    Raises ValueError for an unknown policy or a setting the policy does not take (the message of
    `longflow_patch.policies.check_settings`, as from `longflow_patch.apply`).
    """
    check_policy_name(policy)
    check_settings(policy, raw)
    fields = {field.name: field for field in dataclasses.fields(POLICIES[policy])}
    return {name: _cast(value, fields[name].type, name) for name, value in raw.items()}


def parse_settings(items: Iterable[str]) -> dict[str, str]:
    """``NAME=VALUE`` items of a command line (``--setting``) as ``{name: text}``; a dash in a name
    reads as an underscore. Raises ValueError for an item without ``=``."""
    settings = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--setting takes NAME=VALUE, got {item!r}")
        settings[name.strip().replace("-", "_")] = value
    return settings


def reject_mistyped_settings(policy: str, names: Iterable[str]) -> None:
    """Raise ValueError for any of ``names`` (arguments that are no policy's settings) that is a near
    miss of one of ``policy``'s settings, such as ``sink_token``: lm-eval would otherwise pass it on
    to the model's ``from_pretrained`` and fail there with an error naming the model class."""
    known = [field.name for field in dataclasses.fields(POLICIES[policy])]
    for name in names:
        if difflib.get_close_matches(name, known, n=1, cutoff=0.7):
            raise ValueError(unknown_setting_message(policy, name))


def as_bool(value: object, name: str) -> bool:
    """``value`` (a bool, or text such as ``true``/``0``/``no``) as a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _TRUE + _FALSE:
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return text in _TRUE


def _cast(value: object, kind: object, name: str) -> object:
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind) if isinstance(kind, str) else kind
    members = typing.get_args(kind)
    if len(members) == 2 and type(None) in members:  # an optional setting (``int | None``): cast to its type
        kind = next(member for member in members if member is not type(None))
    if kind is bool:
        return as_bool(value, name)
    if kind is int:
        try:
            number = value if isinstance(value, int) else float(str(value))
        except ValueError:
            number = None
        if number is None or not float(number).is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(number)
    if kind in (float, str):
        return kind(value)
    return value
