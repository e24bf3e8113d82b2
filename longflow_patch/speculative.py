"""LongSpec-style lossless speculative decoding with a constant-size-KV draft.

    out = longflow_patch.speculative_generate(model, input_ids, max_new_tokens=512, draft="self", budget=1024)

Each round (a plain loop, gpt-fast style):

1. the draft proposes ``k`` tokens, one decode step each, over its constant-size LongFlow cache
   (``draft="self"``: the target's own weights; or a smaller model with the same vocabulary);
2. the target scores the last accepted token and the ``k`` drafts in one forward over its full
   cache; each layer's attention is ``torch.ops.longflow.verify_attention`` (the long prefix read
   once for all draft queries, the draft tokens under a causal mask, merged by log-sum-exp);
3. acceptance: greedy keeps the drafts that match the target's argmax, then the target's own
   token; sampling uses standard speculative sampling (accept ``d`` with ``min(1, p(d) / q(d))``,
   else sample from ``max(0, p - q)`` normalised; a bonus token from ``p`` when all are accepted),
   so the output follows the target's distribution exactly;
4. rollback: the target's cache is cut back to the accepted tokens, the draft's compressed cache
   undoes its rejected steps (`DraftCache`).

For a self-draft the prompt runs once: the target's prompt pass also fills the draft's cache.
With ``compile=True`` a whole round's device work, the draft's chain of ``k`` steps (token choice
included: greedy argmax, or Gumbel-max sampling with noise drawn before the chain) and the
``k + 1``-token verification forward, is compiled as one static-shape graph (both caches keep
fixed addresses and device-side lengths), so a round is one CUDA-graph replay on a GPU plus the
acceptance and rollback; the few shorter rounds at the end of an output run eagerly.

Greedy output equals ``model.generate(do_sample=False)`` token for token, up to floating-point
ties: verification computes the same logits in a different order (a ``T``-row forward instead of
``T`` one-row forwards), as every speculative decoder does.

Batch size 1: rows of a batch accept different numbers of tokens, so their caches would need
ragged lengths (the verify op supports ragged prefixes; the loop and caches do not yet).
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from longflow_patch.compat import cache_keyword
from longflow_patch.patch import SUPPORTED_MODELS, _check_model, apply, unapply
from longflow_patch.policies import make_policy
from longflow_patch.sampling import Sampler
from longflow_patch.speculative_cache import DraftCache, SpeculativeCache


@dataclass
class SpeculativeStats:
    """Counters of one `speculative_generate` call.

    Attributes:
        new_tokens: tokens generated (EOS included).
        rounds: verification forwards of the target (after the prompt forward).
        drafted: draft tokens proposed; ``accepted``: those the target kept.
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
    def tokens_per_round(self) -> float:
        """New tokens per target forward, the prompt forward included."""
        return self.new_tokens / (self.rounds + 1)


@contextlib.contextmanager
def _patched(model: nn.Module, budget: int) -> Iterator[None]:
    """Patch ``model``'s attention for the duration, unless it already is; restore it afterwards."""
    if hasattr(model, "_longflow_policy"):
        yield
        return
    apply(model, budget=budget)
    try:
        yield
    finally:
        unapply(model)


def _positions(start: int, count: int, device: torch.device) -> torch.Tensor:
    """Position ids ``[1, count]`` int64: ``start, start + 1, ...``."""
    return torch.arange(start, start + count, device=device)[None]


def _compile_options(compile: bool | dict) -> dict | None:
    """torch.compile options for the draft chain and the verification forward, or None (eager)."""
    if isinstance(compile, dict):
        return compile
    return dict(fullgraph=True, dynamic=False, mode="reduce-overhead") if compile else None


class _Round:
    """The decoding state of one `speculative_generate` call (batch size 1)."""

    def __init__(self, target: nn.Module, draft: nn.Module, draft_cache: DraftCache, sampler: Sampler, k: int,
                 compile_options: dict | None):  # fmt: skip
        self.target, self.draft, self.draft_cache, self.sampler, self.k = target, draft, draft_cache, sampler, k
        self.stats = SpeculativeStats()
        self.cache_keyword = cache_keyword(target)  # read here: the compiled round does not trace a signature
        # Compiled: a full round (k draft steps, then the k + 1-token verification) is one graph per
        # number of pending tokens (1, or 2 after a round that accepted every draft).
        self.full_round = None if compile_options is None else torch.compile(self.draft_and_verify, **compile_options)

    def _forward(self, model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache,
                 logits_to_keep: int = 0) -> torch.Tensor:  # fmt: skip
        """Logits ``[n, V]`` (float32) of ``ids`` ``[1, n]`` at ``positions`` ``[1, n]``, from
        ``model`` over ``cache``."""
        out = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=logits_to_keep,
                    **{self.cache_keyword: cache})  # fmt: skip
        return out.logits[0].float()

    def prefill(self, prompt: torch.Tensor, capacity: int) -> torch.Tensor:
        """Fill both caches from the prompt ``[1, L]``; returns the first new token ``[1]``."""
        shared = self.draft is self.target
        self.target_cache = SpeculativeCache(self.target.config.num_hidden_layers, capacity,
                                             self.draft_cache if shared else None)  # fmt: skip
        positions = _positions(0, prompt.shape[1], prompt.device)
        logits = self._forward(self.target, prompt, positions, self.target_cache, logits_to_keep=1)
        if not shared:
            self._forward(self.draft, prompt, positions, self.draft_cache, logits_to_keep=1)
        self.draft_len = prompt.shape[1]  # tokens the draft cache has consumed
        return self.sampler.sample(self.sampler.probs(logits))

    def draft_chain(self, ids: torch.Tensor, positions: torch.Tensor, noise: torch.Tensor | None, count: int):
        """``count`` draft decode steps: the first reads the pending tokens ``ids`` ``[1, n]`` at
        ``positions`` ``[1, n]``, each later one the token before it. Returns the drafts
        ``[count]`` int64 and their scores ``[count, V]`` (`Sampler.probs`). No host decision
        inside, so it compiles into one graph; ``noise`` ``[count, V]`` comes from `Sampler.noise`."""
        tokens, scores = [], []
        for step in range(count):
            q = self.sampler.probs(self._forward(self.draft, ids, positions, self.draft_cache, logits_to_keep=1))
            token = self.sampler.pick(q, None if noise is None else noise[step : step + 1])
            tokens.append(token)
            scores.append(q)
            ids, positions = token[None], positions[:, -1:] + 1
        return torch.cat(tokens), torch.cat(scores)

    def draft_and_verify(self, pending: torch.Tensor, positions: torch.Tensor, noise: torch.Tensor | None,
                         count: int):  # fmt: skip
        """`draft_chain`, then the target's forward over the last accepted token (the last of
        ``pending``) and the ``count`` drafts. Returns the drafts ``[count]``, their draft scores
        ``[count, V]`` and the target's scores ``[count + 1, V]``; device work only, one graph."""
        drafts, draft_scores = self.draft_chain(pending, positions, noise, count)
        verify_ids = torch.cat([pending[:, -1:], drafts[None]], dim=1)
        verify_positions = positions[:, -1:] + torch.arange(count + 1, device=positions.device)
        logits = self._forward(self.target, verify_ids, verify_positions, self.target_cache)
        return drafts, draft_scores, self.sampler.probs(logits)

    def step(self, sequence: torch.Tensor, remaining: int) -> torch.Tensor:
        """One draft-verify-accept round after the accepted ``sequence`` ``[N]``; returns the new
        tokens (at least one) and leaves both caches holding exactly the accepted tokens."""
        count = min(self.k, remaining - 1)
        length, device = sequence.shape[0], sequence.device
        if count:
            self.draft_cache.commit()
            pending = sequence[self.draft_len :][None]
            noise = self.sampler.noise(count, self.target.config.vocab_size, device)
            full = self.full_round is not None and count == self.k  # short rounds at the end run eagerly
            round_fn = self.full_round if full else self.draft_and_verify
            positions = _positions(self.draft_len, pending.shape[1], device)
            drafts, draft_scores, target_scores = round_fn(pending, positions, noise, count)
            self.stats.draft_forwards += count
        else:
            drafts, draft_scores = sequence.new_empty(0), None
            logits = self._forward(
                self.target, sequence[-1:][None], _positions(length - 1, 1, device), self.target_cache
            )
            target_scores = self.sampler.probs(logits)
        accepted, last = self.sampler.accept(drafts, draft_scores, target_scores)
        self.target_cache.rollback(length + accepted)
        if count:
            kept = min(accepted, count - 1)  # the draft has consumed its pending tokens and count - 1 drafts
            self.draft_cache.rollback(count - 1 - kept, logged=pending.shape[1] + count - 1)
            self.draft_len = length + kept
        self.stats.rounds += 1
        self.stats.drafted += count
        self.stats.accepted += accepted
        return torch.cat([drafts[:accepted], last])


def _check_inputs(model: nn.Module, draft: nn.Module, input_ids: torch.Tensor, num_draft_tokens: int) -> None:
    _check_model(model)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate supports batch size 1; got input_ids of shape {tuple(input_ids.shape)}")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if draft is not model:
        if type(draft).__name__ not in SUPPORTED_MODELS:
            raise TypeError(f"unsupported draft model {type(draft).__name__}; supported: {', '.join(SUPPORTED_MODELS)}")
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's "
                f"({model.config.vocab_size}); a draft must share the target's tokenizer"
            )
        _check_model(draft)


def _stop_index(tokens: torch.Tensor, eos: set[int]) -> int | None:
    """Index just past the first EOS in ``tokens`` ``[n]``, or None."""
    if eos:
        for index, token in enumerate(tokens.tolist()):
            if token in eos:
                return index + 1
    return None


@torch.inference_mode()
def speculative_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    draft: str | nn.Module = "self",
    budget: int = 1024,
    num_draft_tokens: int = 4,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    compile: bool | dict = False,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SpeculativeStats]:
    """Generate like ``model.generate``, faster, with the target's output distribution.

    Args:
        model: a Llama / Qwen2 / Qwen3 causal LM (patched by `apply` or not: an unpatched model
            is patched for the call and restored).
        input_ids: ``[1, L]`` prompt; ``attention_mask`` ``[1, L]`` may mark left padding.
        max_new_tokens: defaults to the generation config's (or ``max_length - L``).
        draft: ``"self"`` (the same model over a constant-size LongFlow cache of ``budget`` slots
            per layer) or a smaller Llama / Qwen2 / Qwen3 model with the same vocabulary (also
            over a ``budget``-slot LongFlow cache).
        num_draft_tokens: draft tokens per round ``k``; each round verifies ``k + 1`` positions.
        do_sample, temperature, top_k, top_p: default to the model's generation config.
        generator: random source for sampling (on the model's device).
        compile: compile each round's ``k``-step draft chain and ``k + 1``-token verification as one graph
            (``fullgraph=True``, static shapes; ``True``: ``mode="reduce-overhead"``, CUDA graphs on
            a GPU; a dict: these ``torch.compile`` options). Apply `longflow_patch.apply` to the
            models first, or each call re-patches them and recompiles.
        return_stats: also return a `SpeculativeStats`.

    Returns:
        ``[1, L + n]`` token ids, the prompt (as given) followed by the new tokens, stopping after
        EOS or ``max_new_tokens``, like ``generate``.
    """
    draft_model = model if isinstance(draft, str) and draft == "self" else draft
    if isinstance(draft_model, str):
        raise ValueError(f"draft must be 'self' or a model, got {draft!r}")
    _check_inputs(model, draft_model, input_ids, num_draft_tokens)
    config = model.generation_config
    sampler = Sampler.from_config(config, do_sample, temperature, top_k, top_p, generator)
    prompt = input_ids[0] if attention_mask is None else input_ids[0][attention_mask[0].bool()]
    if max_new_tokens is None:
        max_new_tokens = config.max_new_tokens or max(config.max_length - input_ids.shape[1], 0)
    eos = config.eos_token_id if config.eos_token_id is not None else []
    eos = {eos} if isinstance(eos, int) else set(eos)
    draft_cache = DraftCache(make_policy("longflow", budget=budget), draft_model.config.num_hidden_layers,
                             num_draft_tokens + 1)  # fmt: skip

    decoder = _Round(model, draft_model, draft_cache, sampler, num_draft_tokens, _compile_options(compile))
    new = prompt.new_empty(0)
    if max_new_tokens > 0:
        with _patched(model, budget), _patched(draft_model, budget):
            new = decoder.prefill(prompt[None], prompt.shape[0] + max_new_tokens + num_draft_tokens + 1)
            stop = _stop_index(new, eos)
            while stop is None and new.shape[0] < max_new_tokens:
                tokens = decoder.step(torch.cat([prompt, new]), max_new_tokens - new.shape[0])
                stop = None if (hit := _stop_index(tokens, eos)) is None else new.shape[0] + hit
                new = torch.cat([new, tokens])
            new = new[: stop or max_new_tokens]
    decoder.stats.new_tokens = new.shape[0]
    output = torch.cat([input_ids, new[None].to(input_ids.dtype)], dim=1)
    return (output, decoder.stats) if return_stats else output
