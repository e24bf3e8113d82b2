"""What every kind of speculative round shares: its counters, the target forward, compilation."""

from dataclasses import dataclass

import torch
from torch import nn

from longflow_patch.compat import cache_keyword
from longflow_patch.sampling import Sampler


@dataclass
class SpeculativeStats:
    """Counters of one `speculative_generate` call.

    Attributes:
        new_tokens: tokens generated (EOS included).
        rounds: verification forwards of the target (after the prompt forward).
        drafted: draft positions proposed (a chain's tokens; a tree's depth, the most a round can
            keep); ``accepted``: draft tokens the target kept.
        draft_forwards: decode forwards of the draft model.
    """

    new_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accepted_per_round(self) -> float:
        """Draft tokens kept per verification round (0 before any round)."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per target forward, the prompt forward included."""
        return self.new_tokens / (self.rounds + 1)


def position_ids(start: int, count: int, device: torch.device) -> torch.Tensor:
    """Position ids ``[1, count]`` int64: ``start, start + 1, ...``."""
    return torch.arange(start, start + count, device=device)[None]


def compile_settings(compile: bool | dict) -> dict | None:
    """torch.compile options for a round's device work, or None (eager)."""
    if isinstance(compile, dict):
        return compile
    return dict(fullgraph=True, dynamic=False, mode="reduce-overhead") if compile else None


class RoundBase:
    """The decoding state of one `speculative_generate` call (batch size 1): the target, the
    sampler, the counters, and ``full_round``, the compiled `draft_and_verify` (None: eager)."""

    def __init__(self, target: nn.Module, sampler: Sampler, compile_options: dict | None):
        self.target, self.sampler = target, sampler
        self.stats = SpeculativeStats()
        self.cache_keyword = cache_keyword(target)  # read here: the compiled round does not trace a signature
        # Compiled: a full round is one graph per number of pending tokens (1, or 2 after a round that
        # accepted every draft); the shorter rounds at the end of an output run eagerly.
        self.full_round = None if compile_options is None else torch.compile(self.draft_and_verify, **compile_options)

    def draft_and_verify(self, *args: object):
        raise NotImplementedError

    def _forward(self, model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache,
                 logits_to_keep: int = 0) -> torch.Tensor:  # fmt: skip
        """Logits ``[n, V]`` (float32) of ``ids`` ``[1, n]`` at ``positions`` ``[1, n]``, from
        ``model`` over ``cache``."""
        out = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=logits_to_keep,
                    **{self.cache_keyword: cache})  # fmt: skip
        return out.logits[0].float()

    def count_round(self, drafted: int, accepted: int) -> None:
        self.stats.rounds += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
