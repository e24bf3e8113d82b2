"""Compression policies: each is a small class with one scoring rule.

Two families share the cache and the fused op:

- per-step policies (LongFlow, H2O, StreamingLLM, full cache): every decode step the fused op
  scores the cached slots (``score_kind``, optionally accumulated over steps) and the lowest
  unprotected slot receives the next token. Static shapes: these compile and capture.
- compacting policies (SnapKV in its decode-time form, R-KV, random): new tokens fill a buffer of
  free slots; when it is full, the cache is re-selected at once by the policy's
  ``compaction_scores``, keeping ``budget - buffer`` tokens (a head with its own budget: that less
  the buffer). These run eagerly.

Every policy also scores the prompt when it is longer than the budget (``prompt_scores``); the
compacting ones by their own re-selection rule, observed by the last prompt queries.
"""

import dataclasses
import difflib
import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from longflow_patch.kernels.decode_attention_reference import ScoreKind
from longflow_patch.prefill import score_prompt

if TYPE_CHECKING:
    from longflow_patch.profiles import BudgetProfile


@dataclass(frozen=True)
class Policy:
    """Settings shared by every policy.

    Attributes:
        budget: slots per sequence per layer (per KV head when ``per_head``); the cache never holds more.
        sink_tokens: the first positions of each sequence, never evicted.
        recent_window: the newest tokens (the current one included), never evicted.
        per_head: evict per KV head instead of one slot shared by all heads of a layer.
        observation_window: recent queries whose attention scores tokens when re-selecting
            (the last prompt queries for a long prompt; the last decode queries when compacting).
        pooling_kernel: width of the average pooling over prompt scores (SnapKV's clustering).
    """

    name: ClassVar[str]
    score_kind: ClassVar[ScoreKind]
    accumulate: ClassVar[bool] = False
    sized_by_generate: ClassVar[bool] = False

    budget: int
    sink_tokens: int = 4
    recent_window: int = 8
    per_head: bool = False
    observation_window: int = 32
    pooling_kernel: int = 7

    def __post_init__(self) -> None:
        check_budget(self.budget)
        for field in ("sink_tokens", "recent_window"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.observation_window < 1 or self.pooling_kernel < 1 or self.pooling_kernel % 2 == 0:
            raise ValueError("observation_window must be >= 1 and pooling_kernel a positive odd number")
        if self.budget < self.minimum_budget:
            raise ValueError(
                f"budget={self.budget} is too small for policy {self.name!r}: it must be at least "
                f"{self.minimum_budget_rule} = {self.minimum_budget}, so that a slot is always free to evict"
            )

    @property
    def minimum_budget(self) -> int:
        return self.sink_tokens + self.recent_window + 1

    @property
    def minimum_budget_rule(self) -> str:
        return "sink_tokens + recent_window + 1"

    @property
    def compacting(self) -> bool:
        """Whether the cache is re-selected at once when a buffer of new tokens is full (else one
        slot is chosen per step)."""
        return False

    @property
    def reserve(self) -> int:
        """Slots per KV head left free when the prompt or the cache is re-selected."""
        return 0

    def layer_slots(self, layer: int) -> int:
        """Physical slots per sequence and KV head of ``layer`` (allocated once)."""
        return self.budget

    def head_limits(self, layer: int) -> list[int] | None:
        """Live slots of each KV head of ``layer`` when budgets are ragged, else None (all slots)."""
        return None

    @property
    def reallocates_heads(self) -> bool:
        """Whether budget moves between the KV heads of a layer during decoding (ReasonAlloc)."""
        return False

    @property
    def compileable(self) -> bool:
        """Whether decoding keeps static shapes and no host decisions (compile and CUDA graphs)."""
        return not self.compacting

    def prompt_scores(self, query, keys, values, is_token, positions, scale) -> torch.Tensor:
        """Importance of each prompt token, ``[B, Hkv, T]`` float32 (higher is kept).

        ``query`` ``[B, Hq, T, D]``, ``keys``/``values`` ``[B, Hkv, T, D]``, ``is_token`` and
        ``positions`` ``[B, T]``. Default: SnapKV-style attention from the last prompt queries,
        weighted the way this policy scores decode steps.
        """
        if self.score_kind == ScoreKind.POSITION:
            return positions.float()[:, None, :].expand(-1, keys.shape[1], -1)
        return score_prompt(
            query, keys, values, is_token, scale, self.observation_window, self.pooling_kernel, self.score_kind
        )


class LongFlowPolicy(Policy):
    """LongFlow: a slot's importance is the size of its contribution to the current output,
    ``softmax weight x ||v||_1``, from the current query alone; no scores are kept between steps.

    Based on LongFlow (https://arxiv.org/abs/2603.11504)."""

    name = "longflow"
    score_kind = ScoreKind.CONTRIBUTION


@dataclass(frozen=True)
class H2OPolicy(Policy):
    """H2O (heavy hitters): attention weights accumulated over all steps since a token arrived.

    As in the paper, the budget is split evenly between heavy hitters and the newest tokens:
    ``recent_window`` defaults to half the budget. (With a short window the accumulated scores,
    which grow with a token's age, evict each new token as soon as it leaves the window.)

    Based on H2O (https://arxiv.org/abs/2306.14048).
    """

    name = "h2o"
    score_kind = ScoreKind.ATTENTION
    accumulate = True

    recent_window: int | None = None

    def __post_init__(self) -> None:
        if self.recent_window is None:
            object.__setattr__(self, "recent_window", self.budget // 2)
        super().__post_init__()


class StreamingLLMPolicy(Policy):
    """StreamingLLM: attention sinks plus the most recent tokens; the oldest other token goes first.

    Based on StreamingLLM (https://arxiv.org/abs/2309.17453)."""

    name = "streamingllm"
    score_kind = ScoreKind.POSITION


class FullCachePolicy(Policy):
    """No compression: each ``generate`` call sizes the cache to prompt + new tokens, so nothing
    is evicted (the reference every other policy is measured against)."""

    name = "full"
    score_kind = ScoreKind.POSITION
    sized_by_generate = True


@dataclass(frozen=True)
class CompactingPolicy(Policy):
    """Base of the policies that re-select the whole cache when a buffer of new tokens is full.

    Attributes:
        buffer: free slots opened by each re-selection; new tokens fill them one per step.
    """

    score_kind = ScoreKind.POSITION  # per-step choice only picks free slots; eviction is by compaction
    buffer: int = 64

    @property
    def minimum_budget(self) -> int:
        return self.sink_tokens + self.recent_window + self.buffer + 1

    @property
    def minimum_budget_rule(self) -> str:
        return "sink_tokens + recent_window + buffer + 1"

    @property
    def compacting(self) -> bool:
        return True

    @property
    def reserve(self) -> int:
        return self.buffer

    def compaction_scores(self, keys, slot_pos, queries, scale) -> torch.Tensor:
        """Importance of each cached slot, ``[B, Hkv, S]`` float32 (higher is kept).

        ``keys`` ``[B, Hkv, S, D]``; ``slot_pos`` ``[B, Hkv, S]`` (-1 empty); ``queries``
        ``[B, Hq, W, D]``, the most recent decode queries.
        """
        raise NotImplementedError

    def prompt_scores(self, query, keys, values, is_token, positions, scale) -> torch.Tensor:
        """The re-selection rule over the prompt, with its last ``observation_window`` queries as
        the recent ones (padding is an empty slot). Recency alone would drop the prompt's start."""
        slot_pos = torch.where(is_token, positions, -1)[:, None, :].expand(-1, keys.shape[1], -1)
        return self.compaction_scores(keys, slot_pos, query[:, :, -self.observation_window :], scale)


def window_attention(keys: torch.Tensor, slot_pos: torch.Tensor, queries: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of ``queries`` ``[B, Hq, W, D]`` over the valid cached ``keys``, summed over
    the window and each group's query heads: ``[B, Hkv, S]`` float32."""
    batch, kv_heads, _, head_dim = keys.shape
    grouped = queries.float().reshape(batch, kv_heads, -1, head_dim)
    logits = torch.einsum("bhqd,bhsd->bhqs", grouped, keys.float()) * scale
    logits = logits.masked_fill((slot_pos < 0)[:, :, None, :], -torch.inf)
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(dim=2)


class SnapKVPolicy(CompactingPolicy):
    """SnapKV in the decode-time form used by reasoning-compression papers: when the buffer is
    full, keep the tokens the most recent window of queries attends to most.

    Based on SnapKV (https://arxiv.org/abs/2404.14469)."""

    name = "snapkv"

    def compaction_scores(self, keys, slot_pos, queries, scale) -> torch.Tensor:
        return window_attention(keys, slot_pos, queries, scale)


@dataclass(frozen=True)
class RKVPolicy(CompactingPolicy):
    """R-KV: importance (attention from recent queries) minus redundancy (how similar a key is to
    the other cached keys), so near-duplicate reasoning steps are dropped first.

    Choices where the paper leaves room: both terms are normalised to distributions over the
    cached slots of a head (importance by its sum, redundancy by a softmax of each key's mean
    cosine similarity to the other valid keys), and ``score = importance_weight * importance -
    (1 - importance_weight) * redundancy`` with the paper's weight 0.1.

    The mean similarity needs no ``[S, S]`` matrix: a unit key's dot product with the sum of all
    valid unit keys, less its product with itself, over the count of the others. Memory stays
    ``O(S)`` per head, so re-selecting a large batch of long caches fits beside the model.

    Based on R-KV (https://arxiv.org/abs/2505.24133).
    """

    name = "rkv"
    importance_weight: float = 0.1

    def compaction_scores(self, keys, slot_pos, queries, scale) -> torch.Tensor:
        valid = slot_pos >= 0
        importance = window_attention(keys, slot_pos, queries, scale)
        importance = importance / importance.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = torch.nn.functional.normalize(keys.float(), dim=-1) * valid[..., None]
        others = (valid.sum(dim=-1, keepdim=True) - 1).clamp_min(1)
        self_similarity = unit.square().sum(dim=-1)
        mean_similarity = (torch.einsum("bhsd,bhd->bhs", unit, unit.sum(dim=2)) - self_similarity) / others
        redundancy = torch.softmax(mean_similarity.masked_fill(~valid, -torch.inf), dim=-1).nan_to_num_(0.0)
        weight = self.importance_weight
        return weight * importance - (1 - weight) * redundancy


@dataclass(frozen=True)
class RandomPolicy(CompactingPolicy):
    """Random eviction, the floor: when the buffer is full, keep a uniformly random subset."""

    name = "random"
    seed: int = 0

    def compaction_scores(self, keys, slot_pos, queries, scale) -> torch.Tensor:
        # A fresh draw per re-selection (the newest position moves on), reproducible from the seed.
        generator = torch.Generator(device=keys.device).manual_seed(self.seed + int(slot_pos.max()))
        return torch.rand(slot_pos.shape, generator=generator, device=keys.device)


SCORERS = ("longflow", "rkv")
"""Token scorers the allocating policies (``lukv``, ``reasonalloc``) can run over (``scorer=``)."""


@dataclass(frozen=True)
class ProfiledPolicy(Policy):
    """Budgets that differ across layers and KV heads, from an offline profile
    (`longflow_patch.profiles.BudgetProfile`, written by ``recipes/profile_budgets.py``), over a
    token scorer: which tokens a head keeps within its budget.

    ``budget`` keeps its meaning: the average slots per KV head per layer, so the total KV memory
    equals a uniform policy's at the same ``budget``; the profile is re-solved for that total.
    Eviction is per KV head by default. With ``per_head=False`` the allocation is layer-wise only:
    the heads of a layer share eviction and its budget (the mean of its heads' solved budgets,
    rounded down, so the total never exceeds uniform's), and ReasonAlloc's head step is off.

    Both papers allocate over an existing scorer (ReasonAlloc's over R-KV, LU-KV's budgets are
    "metric-universal"), so the scorer is a setting: ``"longflow"`` scores every step in the fused
    op and compiles; ``"rkv"`` re-selects each head at once by R-KV's importance minus redundancy
    when ``buffer`` new tokens have arrived (eager, as uniform R-KV). By default it is the scorer
    the profile was measured under (its ``scorer``; ``"longflow"`` when the profile records none),
    and another one draws a warning: budgets measured under one scorer misfit another. On the toy
    reasoner, whose profiles are measured under R-KV (``bench/results/accuracy_toy_allocation.json``
    and ``accuracy_toy_high_budgets.json``): over R-KV, LU-KV solves more problems than any uniform
    policy at 256 slots, 10% and 60-90% of the trace (at 75%: 100%, against uniform R-KV's 78.5% and
    LongFlow's 30.2%) and fewer than uniform R-KV at 512, 20% and 40%. Over LongFlow the same
    budgets solve 1.5% at 75% per head and 9.2% layer-wise; layer-wise with ``floor_share=0.9``,
    39.2%.

    Attributes:
        profile: path of the profile JSON, or several paths of profiles of this method measured at
            different operating points (their ``context_budget``): the policy solves with the one
            nearest its ``budget`` in ratio (ties: the first given).
        scorer: the token scorer, one of ``SCORERS``; None (default): the profile's.
        buffer: free slots per head opened by each re-selection (compacting scorers only).
        floor_share: every head keeps at least this fraction of ``budget`` (on top of the
            profile's and the scorer's minimum).
    """

    profile: str | Path | tuple[str | Path, ...] | None = None
    per_head: bool = True
    scorer: str | None = None
    buffer: int = 64
    floor_share: float = 0.0

    def __post_init__(self) -> None:
        if self.profile is None:
            raise ValueError(
                f"policy {self.name!r} needs profile=PATH, a budget profile written by recipes/profile_budgets.py "
                f"(the bundled toy reasoner's: longflow_patch.toy.profile_paths({self.name!r}); on a command line: "
                "--setting profile=PATH)"
            )
        if not isinstance(self.profile, str | Path):
            object.__setattr__(self, "profile", tuple(self.profile))  # hashable, as a frozen policy must be
        measured = sorted({profile.scorer for _, profile in self.profiles if profile.scorer is not None})
        if self.scorer is None:
            if len(measured) > 1:
                raise ValueError(f"policy {self.name!r}: its profiles were measured under different scorers "
                                 f"{measured}; pass scorer=")  # fmt: skip
            object.__setattr__(self, "scorer", measured[0] if measured else "longflow")
        if self.scorer not in SCORERS:
            raise ValueError(f"policy {self.name!r}: unknown scorer {self.scorer!r}; available: {SCORERS}")
        if other := [scorer for scorer in measured if scorer != self.scorer]:
            warnings.warn(
                f"policy {self.name!r} over scorer {self.scorer!r} uses budgets measured under {other[0]!r}: budgets "
                "measured under one scorer misfit another (on the toy reasoner, R-KV budgets over LongFlow solve "
                "fewer problems than uniform LongFlow); leave scorer unset, or re-profile with "
                f"recipes/profile_budgets.py --scorer {self.scorer}",
                stacklevel=3,
            )
        if not 0.0 <= self.floor_share <= 1.0:
            raise ValueError(f"policy {self.name!r}: floor_share must lie in [0, 1], got {self.floor_share}")
        try:
            self.token_scorer  # noqa: B018  (builds and validates the scorer's settings)
        except ValueError as error:
            raise ValueError(f"policy {self.name!r} over scorer {self.scorer!r}: {error}") from None
        super().__post_init__()
        if self.budget < (floor := self.budget_profile.minimum):
            raise ValueError(
                f"budget={self.budget} is too small for policy {self.name!r}: its profile gives every KV head at least "
                f"{floor} slots (recipes/profile_budgets.py --minimum), so the budget per head must be at least {floor}"
            )

    @cached_property
    def token_scorer(self) -> Policy:
        """The uniform policy whose scoring rule this allocation runs, with the same settings."""
        scorer = POLICIES[self.scorer]
        settings = dict(budget=self.budget, sink_tokens=self.sink_tokens, recent_window=self.recent_window,
                        per_head=self.per_head, observation_window=self.observation_window,
                        pooling_kernel=self.pooling_kernel)  # fmt: skip
        if issubclass(scorer, CompactingPolicy):
            settings["buffer"] = self.buffer
        return scorer(**settings)

    @property
    def score_kind(self) -> ScoreKind:
        return self.token_scorer.score_kind

    @property
    def compacting(self) -> bool:
        return self.token_scorer.compacting

    @property
    def reserve(self) -> int:
        return self.token_scorer.reserve

    @property
    def minimum_budget(self) -> int:
        return self.token_scorer.minimum_budget

    @property
    def minimum_budget_rule(self) -> str:
        return self.token_scorer.minimum_budget_rule

    def prompt_scores(self, query, keys, values, is_token, positions, scale) -> torch.Tensor:
        return self.token_scorer.prompt_scores(query, keys, values, is_token, positions, scale)

    def compaction_scores(self, keys, slot_pos, queries, scale) -> torch.Tensor:
        return self.token_scorer.compaction_scores(keys, slot_pos, queries, scale)

    @cached_property
    def profiles(self) -> list[tuple[str | Path, "BudgetProfile"]]:
        """The given profile files, each with its path, loaded and checked to be of this method."""
        from longflow_patch.profiles import BudgetProfile

        paths = [self.profile] if isinstance(self.profile, str | Path) else list(self.profile)
        if missing := [str(path) for path in paths if not Path(path).is_file()]:
            raise FileNotFoundError(
                f"policy {self.name!r}: no budget profile at {', '.join(missing)} (write one with "
                f"recipes/profile_budgets.py; the toy reasoner's are longflow_patch.toy.profile_paths({self.name!r}))"
            )
        loaded = [(path, BudgetProfile.load(path)) for path in paths]
        for path, profile in loaded:
            if profile.method != self.name:
                raise ValueError(f"{path} is a {profile.method!r} profile, not {self.name!r}")
        return loaded

    @cached_property
    def budget_profile(self) -> "BudgetProfile":
        """The profile this policy solves: the one given, or of several the one whose
        ``context_budget`` is nearest ``budget`` in ratio."""
        if len(self.profiles) == 1:
            return self.profiles[0][1]
        unplaced = [str(path) for path, profile in self.profiles if profile.context_budget is None]
        if unplaced:
            raise ValueError(f"policy {self.name!r} cannot choose among {len(self.profiles)} profiles: {unplaced} "
                             "record no context_budget (the operating point they were measured at)")  # fmt: skip
        profiles = [profile for _, profile in self.profiles]
        return min(profiles, key=lambda profile: abs(math.log(profile.context_budget / self.budget)))

    @cached_property
    def head_table(self) -> list[list[int]]:
        """Live slots per layer per KV head at this policy's total budget."""
        profile = self.budget_profile
        total = self.budget * profile.num_layers * profile.num_kv_heads
        minimum = max(profile.minimum, self.minimum_budget, int(self.floor_share * self.budget))
        return profile.rescale(total, minimum).head_budget_table()

    def layer_slots(self, layer: int) -> int:
        if not self.per_head:  # the heads share eviction and the mean of their budgets
            return sum(self.head_table[layer]) // len(self.head_table[layer])
        return self.per_head_slots(layer)

    def per_head_slots(self, layer: int) -> int:
        """Physical slots per KV head of ``layer`` when each head evicts on its own."""
        return max(self.head_table[layer])

    def head_limits(self, layer: int) -> list[int] | None:
        return self.head_table[layer] if self.per_head else None


@dataclass(frozen=True)
class LUKVPolicy(ProfiledPolicy):
    """LU-KV: per-head budgets that maximise the profiled marginal utility of keeping tokens
    (greedy on the concave envelope of each head's utility curve), fixed during decoding.
    Each head keeps its own budget's worth under the chosen scorer.

    Every head keeps at least half the average budget (``floor_share=0.5``): the curves are
    measured one head at a time, so they miss how losses compound when many heads are cut at
    once, and without a floor the solver starves heads whose loss alone looks small. On the toy
    reasoner over R-KV, with an earlier profile measured against whole others, the floor took
    accuracy at 40% of the trace from 15.2% to 64.2% (the note of
    ``bench/results/accuracy_toy_allocation.json``).

    Based on LU-KV (https://arxiv.org/abs/2602.08585)."""

    name = "lukv"
    floor_share: float = 0.5


@dataclass(frozen=True)
class ReasonAllocPolicy(ProfiledPolicy):
    """ReasonAlloc: layer budgets pre-allocated from the profile (the layer-wise 'reasoning wave'),
    re-allocated online between the heads of a layer.

    Based on ReasonAlloc (https://arxiv.org/abs/2606.11164).

    Pre-allocation solves the profile's layer utility curves with the greedy solver at this
    policy's total, every layer at least half the average budget (``floor_share=0.5``, for LU-KV's
    reason: the curves are measured one head at a time). On the toy reasoner over R-KV this took
    the teacher-forced KL at 5% of the trace from 0.17 to 0.14 and at 128 slots from 0.20 to 0.15
    (``bench/results/accuracy_toy_allocation.json``); format 1 profiles split the total in
    proportion to a need per layer, and left one layer a third of the average.

    With the LongFlow scorer the fused op re-allocates, from the ranks it has just computed: at
    every position that is a multiple of ``rebalance_every`` it moves one slot, in each row, from
    the head whose second-cheapest token is worth least to the head whose cheapest is worth most,
    when the recipient gains more than the donor loses (`reallocate_one_slot` in
    ``kernels/decode_attention_reference.py``). The step stays on the device: it compiles and
    replays in a CUDA graph. With a compacting scorer it runs at each re-selection and moves
    ``rebalance_slots`` slots: from the head whose last kept tokens draw the least attention from
    the recent queries to the head whose first dropped tokens draw the most, when that gains
    attention. A head keeps at least the policy's minimum budget and at most ``capacity`` times the
    layer's per-head share (the physical allocation).

    Choices the paper leaves open: one slot per move, so a move never drops more than one token
    the donor would have kept, and a move every 4 positions by default, a quarter of the steps,
    so that the current query's ranks, which change from step to step, do not move slots back and
    forth at every token. On the toy reasoner (two KV heads per layer) the step does not gain: with
    it off (``online=False``) accuracy over R-KV is higher at 256 and 10% of the trace on three
    problem seeds, and KL is lower at the tightest budgets over either scorer
    (``bench/results/accuracy_toy_allocation*.json``).

    Attributes:
        online: re-allocate between heads during decoding; ``False`` keeps the pre-allocated split
            (an ablation of the online step: layer budgets only, each head evicting on its own, no
            slack allocated).
        capacity: physical slots per head as a multiple of the layer's per-head share.
        rebalance_every: positions between one-slot moves (LongFlow scorer).
        rebalance_slots: slots moved per re-selection (compacting scorers; 0: share // 16).
    """

    name = "reasonalloc"
    floor_share: float = 0.5
    online: bool = True
    capacity: float = 1.5
    rebalance_every: int = 4
    rebalance_slots: int = 0

    def __post_init__(self) -> None:
        if self.rebalance_every < 1 or self.rebalance_slots < 0:
            raise ValueError(f"policy {self.name!r}: rebalance_every must be >= 1 and rebalance_slots >= 0")
        super().__post_init__()

    def per_head_slots(self, layer: int) -> int:
        if not self.reallocates_heads:
            return super().per_head_slots(layer)
        return math.ceil(self.capacity * super().per_head_slots(layer))

    def slots_to_move(self, layer: int) -> int:
        return self.rebalance_slots or max(1, max(self.head_table[layer]) // 16)

    @property
    def reallocates_heads(self) -> bool:
        return self.per_head and self.online


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        LongFlowPolicy,
        H2OPolicy,
        StreamingLLMPolicy,
        FullCachePolicy,
        SnapKVPolicy,
        RKVPolicy,
        RandomPolicy,
        LUKVPolicy,
        ReasonAllocPolicy,
    )
}
"""Every policy by name: ``apply(model, policy=NAME)`` and ``make_policy(NAME, ...)`` take these keys;
``list(POLICIES)`` lists them, `policy_settings` gives each one's settings."""


def check_policy_name(name: object) -> None:
    """Raise ValueError unless ``name`` is registered in `POLICIES`."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}")


def policy_settings(name: str) -> tuple[str, ...]:
    """The settings policy ``name`` takes (its dataclass fields), ``budget`` first."""
    check_policy_name(name)
    return tuple(field.name for field in dataclasses.fields(POLICIES[name]))


def check_settings(name: str, settings: Iterable[str]) -> None:
    """Raise ValueError naming the first of ``settings`` that policy ``name`` does not take, with
    the settings it does take: the one message every entry point (`apply`, lm-eval's
    ``--model_args``, ``recipes/generate.py``, the demo) gives for a mistyped setting."""
    known = policy_settings(name)
    for setting in settings:
        if setting not in known:
            raise ValueError(unknown_setting_message(name, setting))


def unknown_setting_message(name: str, setting: str) -> str:
    """Why policy ``name`` refuses ``setting``: a near miss, or the policies that take it, and the
    settings ``name`` takes."""
    known = policy_settings(name)
    owners = [other for other, cls in POLICIES.items() if setting in {field.name for field in dataclasses.fields(cls)}]
    if owners:
        hint = f" (a setting of {', '.join(owners)})"
    elif close := difflib.get_close_matches(setting, known, n=1):
        hint = f" (did you mean {close[0]!r}?)"
    else:
        hint = ""
    return f"policy {name!r} has no setting {setting!r}{hint}; its settings: {', '.join(known)}"


def check_budget(budget: object) -> None:
    """Raise TypeError unless ``budget`` is an integer count of KV slots (not a bool, float, text
    or None). Whether it is large enough depends on the policy (`Policy.minimum_budget`)."""
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        return
    if isinstance(budget, float) and 0 < budget < 1:
        hint = (
            ": it looks like a compression ratio, but budget counts KV slots per sequence per layer; to keep a "
            "fraction f of a generation of N tokens (prompt + new tokens), pass budget=int(f * N)"
        )
    elif isinstance(budget, str) and budget.strip().isdigit():
        hint = f"; pass budget={int(budget)}, a number"
    else:
        hint = ""
    raise TypeError(
        f"budget must be an integer number of KV slots per sequence per layer, got {budget!r} "
        f"({type(budget).__name__}){hint}"
    )


def make_policy(name: str, **settings: object) -> Policy:
    """Build the policy registered under ``name`` (a key of `POLICIES`) with the given settings
    (``budget`` and the policy's own, `policy_settings`); clear errors for an unknown name, a
    setting the policy does not take and a budget that is not a slot count."""
    check_policy_name(name)
    check_settings(name, settings)
    if "budget" not in settings:
        raise TypeError(f"policy {name!r} needs budget=SLOTS (KV slots per sequence per layer)")
    check_budget(settings["budget"])
    return POLICIES[name](**settings)
