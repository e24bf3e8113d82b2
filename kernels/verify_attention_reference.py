"""Plain PyTorch reference for speculative verification attention (`kernels/verify_attention.py`).

The target model scores ``T`` draft tokens in one forward. Each draft query attends to two parts:

1. the long prefix already in the target's full cache (every query sees all of it), and
2. the ``T`` draft tokens themselves, under a ``[T, T]`` mask (causal for a chain, or a tree mask).

Each part is a softmax attention with its own log-sum-exp; the two are merged exactly by
`merge_attention_states`, which gives the same result as one softmax over the concatenated keys.

Shapes (B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, S prefix slots, T draft
tokens, D head dim):

- ``q``: ``[B, Hq, T, D]`` (after RoPE)
- ``k_prefix``, ``v_prefix``: ``[B, Hkv, S, D]``; only the first ``prefix_len[b]`` slots of row
  ``b`` are attended (the rest may be stale or unallocated)
- ``prefix_len``: ``[B]`` int32 / int64
- ``k_draft``, ``v_draft``: ``[B, Hkv, T, D]``
- ``draft_mask``: ``[T, T]`` bool, ``draft_mask[i, j]`` True when draft query ``i`` sees draft
  key ``j``; ``None`` means causal (``j <= i``). Every query should see at least itself.

Returns ``[B, Hq, T, D]`` in ``q``'s dtype; the arithmetic is float32.
"""

import torch


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results over disjoint key sets into the result over their union.

    ``out_*`` ``[..., D]`` are softmax-normalised outputs and ``lse_*`` ``[...]`` the natural
    log-sum-exp of the (scaled) logits of each part, ``-inf`` for a part with no visible key.
    Returns ``(out, lse)`` in float32.
    """
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    finite = torch.isfinite(lse)
    weight_a = torch.where(finite, torch.exp(lse_a - lse), 0.0)[..., None]
    weight_b = torch.where(finite, torch.exp(lse_b - lse), 0.0)[..., None]
    return out_a.float() * weight_a + out_b.float() * weight_b, lse


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention returning ``(out, lse)`` in float32.

    ``q`` ``[B, Hkv, G, T, D]``; ``k``/``v`` ``[B, Hkv, N, D]``; ``visible`` broadcastable to
    ``[B, Hkv, G, T, N]``. ``out`` ``[B, Hkv, G, T, D]`` (zeros where nothing is visible),
    ``lse`` ``[B, Hkv, G, T]``.
    """
    logits = torch.einsum("bhgtd,bhnd->bhgtn", q.float(), k.float()) * scale
    logits = logits.masked_fill(~visible, -torch.inf)
    lse = logits.logsumexp(dim=-1)
    probs = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.einsum("bhgtn,bhnd->bhgtd", probs, v.float()), lse


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """``[T, T]`` bool, True on and below the diagonal."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def verify_attention_reference(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    prefix_len: torch.Tensor,
    k_draft: torch.Tensor,
    v_draft: torch.Tensor,
    draft_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Reference verification attention; see the module docstring for shapes and semantics."""
    batch, q_heads, length, head_dim = q.shape
    kv_heads, slots = k_prefix.shape[1], k_prefix.shape[2]
    grouped = q.view(batch, kv_heads, q_heads // kv_heads, length, head_dim)
    in_prefix = torch.arange(slots, device=q.device) < prefix_len.to(q.device)[:, None]
    out_prefix, lse_prefix = attention_with_lse(grouped, k_prefix, v_prefix, in_prefix[:, None, None, None], scale)
    mask = causal_mask(length, q.device) if draft_mask is None else draft_mask.to(q.device)
    out_draft, lse_draft = attention_with_lse(grouped, k_draft, v_draft, mask, scale)
    out, _ = merge_attention_states(out_prefix, lse_prefix, out_draft, lse_draft)
    return out.reshape(batch, q_heads, length, head_dim).to(q.dtype)
