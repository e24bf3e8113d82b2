"""Fidelity of a compressed KV cache: the model's next-token predictions teacher-forced on traces,
with the full cache and with a policy's, compared position by position (KL divergence, top-1
agreement, negative log-likelihood); and where a token sequence falls into a repetition loop."""

from collections.abc import Callable, Sequence

import torch
from transformers import Cache

from longflow_patch.compat import cache_keyword


def padded_rows(
    prompt_ids: Sequence[Sequence[int]], trace_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each row's prompt left-padded and its trace right-padded, as `generate` would lay them out:
    ``(ids [N, P + T] int64, attention mask [N, P + T] int64, P)``."""
    prompt_width, trace_width = max(map(len, prompt_ids)), max(map(len, trace_ids))
    ids, mask = [], []
    for prompt, trace in zip(prompt_ids, trace_ids, strict=True):
        left, right = prompt_width - len(prompt), trace_width - len(trace)
        ids.append([pad_id] * left + list(prompt) + list(trace) + [pad_id] * right)
        mask.append([0] * left + [1] * (len(prompt) + len(trace)) + [0] * right)
    return torch.tensor(ids), torch.tensor(mask), prompt_width


def trace_hidden_states(
    model,
    prompt_ids: Sequence[Sequence[int]],
    trace_ids: Sequence[Sequence[int]],
    pad_id: int,
    new_cache: Callable[[], Cache] | None = None,
    chunk: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states that predict each trace token, teacher-forced: ``[N, T, hidden]`` in
    the model's dtype (the decoder's output, before the LM head: ``model.lm_head`` of row ``n``,
    position ``t`` gives the logits of trace token ``t`` given its prompt and trace tokens ``< t``),
    and the ``[N, T]`` bool mask of real trace tokens.

    Positions are numbered as `generate` numbers a left-padded row, so each row's prompt and trace
    are exactly its own. With ``new_cache`` None the model sees each whole sequence (full
    attention); else ``new_cache()`` gives each chunk of ``chunk`` rows a fresh compressed cache,
    filled by the prompt (prompt selection) and then by the whole trace in one forward, in which
    the patched attention runs the fused decode step token by token: exactly sequential decoding
    with eviction. Chunks keep the full-attention forward's ``[chunk, heads, L, L]`` scores small.
    """
    all_ids, all_mask, prompt_length = padded_rows(prompt_ids, trace_ids, pad_id)
    decoder = model.get_decoder()
    keyword = cache_keyword(decoder)
    hidden = []
    for start in range(0, len(prompt_ids), chunk):
        ids = all_ids[start : start + chunk].to(model.device)
        mask = all_mask[start : start + chunk].to(model.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if new_cache is None:
            states = decoder(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            hidden.append(states[:, prompt_length - 1 : -1])
        else:
            cache = new_cache()
            head, tail = slice(None, prompt_length), slice(prompt_length, None)
            last = decoder(input_ids=ids[:, head], attention_mask=mask[:, head], position_ids=positions[:, head],
                           **{keyword: cache}).last_hidden_state[:, -1:]  # fmt: skip
            states = decoder(input_ids=ids[:, tail], attention_mask=mask, position_ids=positions[:, tail],
                             **{keyword: cache}).last_hidden_state  # fmt: skip
            hidden.append(torch.cat([last, states[:, :-1]], dim=1))
    return torch.cat(hidden), all_mask[:, prompt_length:].bool().to(model.device)


def trace_log_probs(
    model,
    tokenizer,
    prompts: list[str],
    traces: list[str],
    new_cache: Callable[[], Cache] | None = None,
    chunk: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``[N, T, V]`` float32 of each trace token given its prompt and the trace
    before it, teacher-forced, and the ``[N, T]`` bool mask of real trace tokens
    (`trace_hidden_states` over the prompts tokenized with special tokens and the traces without,
    as `generate` would produce them). Holds ``N x T x V`` floats: for a large vocabulary or many
    rows, compare hidden states with `position_metrics` instead."""
    prompt_ids = [tokenizer(text).input_ids for text in prompts]
    trace_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in traces]
    hidden, mask = trace_hidden_states(model, prompt_ids, trace_ids, tokenizer.pad_token_id, new_cache, chunk)
    return torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1), mask


def mean_kl(reference: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean ``KL(reference || log_probs)`` in nats per token over the real trace positions.

    ``reference``/``log_probs``: ``[N, T, V]`` float log-probabilities (`trace_log_probs`);
    ``mask``: ``[N, T]`` bool, True at real trace positions.
    """
    return (reference.exp() * (reference - log_probs)).sum(-1)[mask].mean().item()


def position_metrics(
    lm_head: torch.nn.Module,
    reference: torch.Tensor,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """Compare two runs' predictions of the same trace tokens, ``chunk`` positions at a time (a
    ``[chunk, V]`` float32 block, never ``[N, T, V]``).

    ``reference``/``hidden``: ``[N, T, hidden]`` from `trace_hidden_states` (full cache, policy);
    ``targets``: ``[N, T]`` int64, the trace tokens; ``mask``: ``[N, T]`` bool, real positions.
    Returns ``[N, T]`` float32 CPU tensors, 0 where ``mask`` is False: ``kl``, KL(reference ||
    policy) in nats; ``agree``, 1 where both predict the same top-1 token; ``nll`` and
    ``nll_reference``, minus the log-probability of the target under the policy and the reference.
    """
    rows, columns = mask.nonzero(as_tuple=True)
    metrics = {name: torch.zeros(mask.shape) for name in ("kl", "agree", "nll", "nll_reference")}
    for start in range(0, len(rows), chunk):
        at = rows[start : start + chunk], columns[start : start + chunk]
        full = torch.log_softmax(lm_head(reference[at]).float(), dim=-1)
        policy = torch.log_softmax(lm_head(hidden[at]).float(), dim=-1)
        target = targets[at].to(full.device)[:, None]
        values = {
            "kl": (full.exp() * (full - policy)).sum(-1),
            "agree": (full.argmax(-1) == policy.argmax(-1)).float(),
            "nll": -policy.gather(-1, target)[:, 0],
            "nll_reference": -full.gather(-1, target)[:, 0],
        }
        for name, value in values.items():
            metrics[name][at[0].cpu(), at[1].cpu()] = value.cpu()
    return metrics


def repetition_start(ids: Sequence[int], span: int = 32) -> int | None:
    """Where ``ids`` falls into a repetition loop: the index of the first ``span``-token window
    that repeats an earlier window (overlapping windows count, so a loop of any period up to
    ``span`` and any longer one are caught once ``span`` tokens of it have repeated), or None.

    Tokens before the returned index are the loop-free prefix: each window there is new.
    """
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    seen = set()
    for start in range(len(ids) - span + 1):
        window = tuple(ids[start : start + span])
        if window in seen:
            return start
        seen.add(window)
    return None
