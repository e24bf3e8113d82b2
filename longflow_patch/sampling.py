"""Token choice for `speculative_generate`: greedy or sampling, and the acceptance rule.

Sampling follows ``generate``'s warpers in its order (temperature, top-k, top-p, with the same
tie and boundary rules), so draft and target distributions are the ones ``generate`` samples from.
Acceptance of a chain is standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023),
which leaves the target's distribution unchanged; a tree's nodes (top-k, not sampled) are kept while
the target's own choice at each node is one of its children (`Sampler.accept_tree`).
"""

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from longflow_patch.draft_tree import accepted_path

# generate settings that change the distribution in ways this sampler does not reproduce
_UNSUPPORTED = {
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_p": None,
    "min_new_tokens": 0,
}


@dataclass(frozen=True)
class Sampler:
    """Greedy (``do_sample=False``) or warped sampling. ``scores`` below are ``[n, V]`` float32:
    raw logits when greedy (only their argmax matters), probabilities when sampling."""

    do_sample: bool
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @classmethod
    def from_config(
        cls,
        config: GenerationConfig,
        do_sample: bool | None,
        temperature: float | None,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
    ) -> "Sampler":
        """Explicit arguments first, then the model's generation config."""
        unsupported = {
            name: value
            for name, default in _UNSUPPORTED.items()
            if (value := getattr(config, name, default)) not in (default, None)
        }
        if unsupported:
            raise ValueError(f"speculative_generate does not support these generation settings: {unsupported}")
        do_sample = bool(config.do_sample if do_sample is None else do_sample)
        temperature = config.temperature if temperature is None else temperature
        top_k = config.top_k if top_k is None else top_k
        top_p = config.top_p if top_p is None else top_p
        if do_sample and temperature is not None and temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {temperature}")
        return cls(
            do_sample=do_sample,
            temperature=1.0 if temperature is None else float(temperature),
            top_k=top_k,
            top_p=1.0 if top_p is None else float(top_p),
            generator=generator,
        )

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[n, V]`` -> scores ``[n, V]``: the logits when greedy, else the warped
        sampling distribution (temperature, then top-k, then top-p)."""
        if not self.do_sample:
            return logits
        logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=False)
            drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            drop[..., -1:] = False
            logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
        return logits.softmax(dim=-1)

    def sample(self, scores: torch.Tensor) -> torch.Tensor:
        """One token per row of ``scores`` ``[n, V]``: ``[n]`` int64."""
        if not self.do_sample:
            return scores.argmax(dim=-1)
        return torch.multinomial(scores, 1, generator=self.generator)[:, 0]

    def noise(self, count: int, vocab: int, device: torch.device) -> torch.Tensor | None:
        """Gumbel noise ``[count, V]`` float32 for `pick` when sampling (drawn from ``generator``
        outside any compiled graph), None when greedy."""
        if not self.do_sample:
            return None
        uniform = torch.rand(count, vocab, device=device, generator=self.generator)
        return -torch.log(-torch.log(uniform.clamp_(min=torch.finfo(torch.float32).tiny)))

    def pick(self, scores: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """`sample` without a random op: ``[n]`` tokens from ``scores`` ``[n, V]`` and this row's
        `noise` ``[n, V]``. Sampling by the Gumbel-max trick (``argmax(log p + g)`` is distributed as
        ``p``), so a chain of draft steps with its noise drawn up front compiles into one graph."""
        if noise is None:
            return scores.argmax(dim=-1)
        return (scores.log() + noise).argmax(dim=-1)

    def accept(
        self, drafts: torch.Tensor, draft_scores: torch.Tensor | None, target_scores: torch.Tensor
    ) -> tuple[int, torch.Tensor]:
        """How many of the ``k`` ``drafts`` ``[k]`` the target keeps, and the token that follows them.

        ``draft_scores`` ``[k, V]`` (sampling only) and ``target_scores`` ``[k + 1, V]``, row ``i``
        the distribution of position ``i``. Returns ``(n, token [1])``: the target's correction at
        the first rejection, or a bonus token from row ``k`` when all are accepted.
        """
        count = drafts.shape[0]
        if not self.do_sample:
            target_tokens = target_scores.argmax(dim=-1)
            accepted = int((drafts == target_tokens[:count]).int().cumprod(dim=0).sum())
            return accepted, target_tokens[accepted : accepted + 1]
        if count == 0:
            return 0, self.sample(target_scores[:1])
        rows = torch.arange(count, device=drafts.device)
        p, q = target_scores[rows, drafts], draft_scores[rows, drafts]
        uniform = torch.rand(count, device=drafts.device, generator=self.generator)
        accepted = int((uniform * q < p).int().cumprod(dim=0).sum())  # accept with probability min(1, p / q)
        if accepted == count:
            return accepted, self.sample(target_scores[count:])
        residual = (target_scores[accepted] - draft_scores[accepted]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q: a rejection had probability 0
            residual = target_scores[accepted]
        return accepted, self.sample((residual / residual.sum())[None])

    def accept_tree(
        self, tokens: torch.Tensor, parents: torch.Tensor, target_scores: torch.Tensor
    ) -> tuple[list[int], torch.Tensor]:
        """The draft-tree nodes the target keeps, and the token that follows them.

        ``tokens`` / ``parents`` ``[N]`` int64: each node's token and parent node (-1: the root);
        ``target_scores`` ``[N + 1, V]``: row 0 the target's distribution after the root, row
        ``1 + i`` after node ``i``. At each node from the root the target chooses a token from its
        own distribution there (argmax, or a sample); the walk descends to the child holding it and
        stops at the first node where none does, emitting that token. Every token out is thus the
        target's choice given the tokens before it, whatever the tree holds: lossless for
        candidates that were not sampled from the draft (a tree's top-k). Returns ``(path, token
        [1])``, ``path`` the kept nodes, root side first.
        """
        picks = self.sample(target_scores)
        nodes = tokens.shape[0]
        flat = torch.cat([picks, tokens, parents]).tolist()  # one device-to-host copy
        path = accepted_path(flat[: nodes + 1], flat[nodes + 1 : 2 * nodes + 1], flat[2 * nodes + 1 :])
        row = path[-1] + 1 if path else 0
        return path, picks[row : row + 1]
