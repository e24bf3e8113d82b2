"""Compression policies: each is a small class with one scoring rule.

A policy says how the fused decode op ranks cached slots (``score_kind``), whether scores
accumulate over steps, and how prompt tokens are scored when the prompt is longer than the
budget. Everything else (the cache, the op, the patch) is shared by all policies.
"""

from dataclasses import dataclass
from typing import ClassVar

from longflow_patch.kernels.decode_attention_reference import ScoreKind


@dataclass(frozen=True)
class Policy:
    """Settings shared by every policy.

    Attributes:
        budget: slots per sequence per layer (per KV head when ``per_head``); the cache never holds more.
        sink_tokens: the first positions of each sequence, never evicted.
        recent_window: the newest tokens (the current one included), never evicted.
        per_head: evict per KV head instead of one slot shared by all heads of a layer.
        observation_window: prompt queries whose attention scores the prompt when it exceeds the budget.
        pooling_kernel: width of the average pooling over prompt scores (SnapKV's clustering).
    """

    name: ClassVar[str]
    score_kind: ClassVar[ScoreKind]
    accumulate: ClassVar[bool] = False

    budget: int
    sink_tokens: int = 4
    recent_window: int = 8
    per_head: bool = False
    observation_window: int = 32
    pooling_kernel: int = 7

    def __post_init__(self) -> None:
        minimum = self.minimum_budget
        if self.budget < minimum:
            raise ValueError(
                f"budget={self.budget} is too small for policy {self.name!r}: it must be at least "
                f"sink_tokens + recent_window + 1 = {minimum} so that one slot can be evicted"
            )
        for field in ("sink_tokens", "recent_window"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.observation_window < 1 or self.pooling_kernel < 1 or self.pooling_kernel % 2 == 0:
            raise ValueError("observation_window must be >= 1 and pooling_kernel a positive odd number")

    @property
    def minimum_budget(self) -> int:
        return self.sink_tokens + self.recent_window + 1


class LongFlowPolicy(Policy):
    """LongFlow: a slot's importance is the size of its contribution to the current output,
    ``softmax weight x ||v||_1``, from the current query alone; no scores are kept between steps."""

    name = "longflow"
    score_kind = ScoreKind.CONTRIBUTION


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (LongFlowPolicy,)}


def make_policy(name: str, **settings: object) -> Policy:
    """Build the policy registered under ``name`` with the given settings."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {sorted(POLICIES)}")
    return POLICIES[name](**settings)
