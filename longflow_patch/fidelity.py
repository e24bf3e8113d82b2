"""Fidelity of a compressed KV cache: the model's next-token distributions teacher-forced on
traces, with the full cache and with a policy's, and the mean KL divergence between them."""

from collections.abc import Callable

import torch
from transformers import Cache

from longflow_patch.compat import cache_keyword


def trace_log_probs(
    model,
    tokenizer,
    prompts: list[str],
    traces: list[str],
    new_cache: Callable[[], Cache] | None = None,
    chunk: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``[N, T, V]`` float32 of each trace token given its prompt and the trace
    before it, teacher-forced, and the ``[N, T]`` bool mask of real trace tokens.

    Prompts are left-padded and traces right-padded (tokenized apart, as `generate` would produce
    them), and positions are numbered as `generate` numbers a padded row, so each row's prompt and
    trace are exactly its own. With ``new_cache`` None the model sees the whole sequence (full
    attention); else ``new_cache()`` gives each chunk of ``chunk`` rows a fresh compressed cache,
    filled by the prompt (prompt selection) and then by the trace token by token (the decode
    path). Chunks keep the full-attention forward's ``[chunk, heads, T, T]`` scores small.
    """
    prompt = tokenizer(prompts, return_tensors="pt", padding=True)
    trace = [tokenizer(text, add_special_tokens=False).input_ids for text in traces]
    width = max(map(len, trace))
    trace_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in trace])
    trace_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in trace])
    all_ids = torch.cat([prompt.input_ids, trace_ids], dim=1)
    all_mask = torch.cat([prompt.attention_mask, trace_mask], dim=1)
    prompt_length = prompt.input_ids.shape[1]
    log_probs = []
    for start in range(0, len(prompts), chunk):
        ids = all_ids[start : start + chunk].to(model.device)
        mask = all_mask[start : start + chunk].to(model.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if new_cache is None:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            predicting = logits[:, prompt_length - 1 : -1]
        else:
            cache = new_cache()
            head, tail = slice(None, prompt_length), slice(prompt_length, None)
            last = model(input_ids=ids[:, head], attention_mask=mask[:, head], position_ids=positions[:, head],
                         **{cache_keyword(model): cache}).logits[:, -1:]  # fmt: skip
            logits = model(input_ids=ids[:, tail], attention_mask=mask, position_ids=positions[:, tail],
                           **{cache_keyword(model): cache}).logits  # fmt: skip
            predicting = torch.cat([last, logits[:, :-1]], dim=1)
        log_probs.append(torch.log_softmax(predicting.float(), dim=-1))
    return torch.cat(log_probs), trace_mask.bool().to(model.device)


def mean_kl(reference: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean ``KL(reference || log_probs)`` in nats per token over the real trace positions.

    ``reference``/``log_probs``: ``[N, T, V]`` float log-probabilities (`trace_log_probs`);
    ``mask``: ``[N, T]`` bool, True at real trace positions.
    """
    return (reference.exp() * (reference - log_probs)).sum(-1)[mask].mean().item()
