"""Prompt handling: which prompt keys are real tokens, and which to keep when the prompt is
longer than the budget (SnapKV-style scoring from an observation window of the last queries)."""

import torch
import torch.nn.functional as F

from longflow_patch.kernels.decode_attention_reference import ScoreKind


def key_padding_from_mask(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """``[B, T]`` bool, True where the prompt key is a real token.

    Accepts the forms transformers hands to attention: ``None`` (no padding), a 2-D ``[B, T]``
    mask (flash attention), or a 4-D ``[B, 1, Q, K]`` bool / additive float mask (SDPA, eager),
    whose last query row sees every real key.
    """
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool)
    if attention_mask.dim() == 2:
        return attention_mask[:, -length:].bool()
    if attention_mask.dim() == 4:
        last_row = attention_mask[:, 0, -1, -length:]
        if last_row.dtype == torch.bool:
            return last_row.expand(batch, length)
        return (last_row > torch.finfo(last_row.dtype).min / 2).expand(batch, length)
    raise ValueError(f"unsupported attention mask of shape {tuple(attention_mask.shape)}")


def score_prompt(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    is_token: torch.Tensor,
    scale: float,
    window: int,
    pooling_kernel: int,
    score_kind: ScoreKind,
) -> torch.Tensor:
    """Importance of every prompt key for every KV head, ``[B, Hkv, T]`` float32.

    The last ``window`` queries attend causally over the prompt (padding masked); their softmax
    weights are summed over the window and the group's query heads, multiplied by ``||v||_1``
    for contribution scoring, and average-pooled over neighbouring positions.

    Shapes: ``query`` ``[B, Hq, T, D]``; ``keys``/``values`` ``[B, Hkv, T, D]``; ``is_token`` ``[B, T]``.
    """
    batch, kv_heads, length, head_dim = keys.shape
    group = query.shape[1] // kv_heads
    window = min(window, length)
    observed = query[:, :, -window:].float().view(batch, kv_heads, group, window, head_dim)
    query_pos = torch.arange(length - window, length, device=keys.device)
    visible = (torch.arange(length, device=keys.device)[None, :] <= query_pos[:, None])[None] & is_token[:, None, :]
    scores = []
    for head in range(kv_heads):  # one head at a time bounds the [B, G, W, T] temporary
        logits = torch.einsum("bgwd,btd->bgwt", observed[:, head], keys[:, head].float()) * scale
        logits = logits.masked_fill(~visible[:, None], -torch.inf)
        weight = torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(dim=(1, 2))
        if score_kind == ScoreKind.CONTRIBUTION:
            weight = weight * values[:, head].float().abs().sum(dim=-1)
        scores.append(weight)
    score = torch.stack(scores, dim=1)
    return F.avg_pool1d(score, pooling_kernel, stride=1, padding=pooling_kernel // 2, count_include_pad=False)
