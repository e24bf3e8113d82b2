"""What differs between the transformers releases longflow-patch supports, read off the model.

transformers 5.2x renamed the KV-cache argument of the models' forward, of ``generate`` and of the
attention modules from ``past_key_values`` to ``cache`` (the old name stays accepted, deprecated,
until 5.40). Which one a model takes is read from its forward's signature, and the patched
attention finds the cache under whichever name the decoder layer passed, never by version string.
"""

import functools
import inspect

from torch import nn
from transformers.cache_utils import Cache

CACHE_KEYWORDS = ("cache", "past_key_values")
"""Names under which transformers releases pass the KV cache, newest first."""


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward (and so ``generate``) takes its KV cache."""
    return _cache_keyword_of(type(model))


@functools.cache
def _cache_keyword_of(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise TypeError(
        f"{model_class.__name__}.forward takes no KV cache under any of {CACHE_KEYWORDS}: this transformers "
        "release passes the cache in a way longflow_patch does not know; please report it"
    )


def cache_from_kwargs(kwargs: dict, caller: str) -> tuple[str | None, Cache | None]:
    """The KV cache in a call's keyword arguments, and the keyword it came under.

    Looks under `CACHE_KEYWORDS`. A `Cache` found under any other keyword means transformers renamed
    the argument again: that raises rather than run without the compressed cache.
    """
    given = [name for name in CACHE_KEYWORDS if kwargs.get(name) is not None]
    if len(given) > 1:
        raise TypeError(f"{caller} got a KV cache under both {given[0]!r} and {given[1]!r}; pass one")
    if given:
        return given[0], kwargs[given[0]]
    stray = [name for name, value in kwargs.items() if isinstance(value, Cache)]
    if stray:
        raise TypeError(
            f"{caller} received a KV cache under {stray[0]!r}, a keyword longflow_patch does not know (it reads "
            f"{CACHE_KEYWORDS}): transformers has renamed the cache argument again, and running on would "
            "silently drop the compressed cache; please report it"
        )
    return None, None
