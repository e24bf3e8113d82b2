"""What differs between the transformers releases longflow-patch supports, read off the model.

transformers 5.2x renamed the KV-cache argument of the models' forward, of ``generate`` and of the
attention modules from ``past_key_values`` to ``cache`` (the old name stays accepted, deprecated,
until 5.40). Which one a model takes is read from its forward's signature, and the patched
attention finds the cache under whichever name the decoder layer passed, never by version string.

transformers 5.17-5.25 read ``generate``'s stop check one step late (``DeferredStopCheck``) on
``mps`` only; `defer_stop_check_on_cuda` extends that to the caches the patched ``generate`` makes.
"""

import functools
import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation import utils as generation_utils

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


DEFERRED_STOP_DEVICES = ("cuda",)
"""Devices on which `defer_stop_check_on_cuda` lets ``generate`` read its stop check one step late."""
_IS_SUPPORTED_PARAMETERS = ["device", "cache", "cache_is_returned", "is_assistant"]


def defer_stop_check_on_cuda() -> None:
    """Let transformers' ``generate`` read its stop check one step late on CUDA for a cache that
    the patched ``generate`` made and does not return (``cache.made_by_generate``, no
    ``return_dict_in_generate``); every other cache keeps transformers' rule.

    On CUDA, transformers' ``generate`` reads ``unfinished_sequences.max() == 0`` on the host after
    every step, so the device idles while the host prepares the next one: 2.3 of a 28 ms compiled
    step at 8k on the Qwen3-8B shape (H100). Its ``DeferredStopCheck`` (enabled on ``mps`` only)
    copies that flag without waiting and reads it a step later. That costs one extra forward when
    every row has stopped on an end-of-sequence token, which ``generate`` drops from the tokens it
    returns; the cache that step wrote into is the patched ``generate``'s own, not returned, so it
    needs no roll-back (an evicting cache has none). Idempotent; a transformers release without
    ``DeferredStopCheck``, or whose ``is_supported`` takes other arguments, is left as it is.
    """
    deferred = getattr(generation_utils, "DeferredStopCheck", None)
    if deferred is None or getattr(deferred.is_supported, "defers_own_caches", False):
        return
    transformers_rule = deferred.is_supported
    if list(inspect.signature(transformers_rule).parameters) != _IS_SUPPORTED_PARAMETERS:
        return

    def is_supported(device: torch.device, cache: Cache | None, cache_is_returned: bool, is_assistant: bool) -> bool:
        own = getattr(cache, "made_by_generate", False) and not cache_is_returned and not is_assistant
        return (own and device.type in DEFERRED_STOP_DEVICES) or transformers_rule(
            device, cache, cache_is_returned, is_assistant
        )

    is_supported.defers_own_caches = True
    deferred.is_supported = staticmethod(is_supported)
