"""A token-level progress bar for ``generate``: tokens written so far and tokens/s, for long runs."""

import torch
from tqdm import tqdm
from transformers import StoppingCriteria


class TokenProgress(StoppingCriteria):
    """Advances ``bar`` by one token per sequence per decoding step; never stops generation.

    Pass it in ``generate(..., stopping_criteria=StoppingCriteriaList([TokenProgress(bar)]))``;
    a ``tqdm(unit="tok")`` bar then shows the tokens generated and the rate in tokens/s. It runs in
    ``generate``'s host loop, outside the (compiled) decode step.
    """

    def __init__(self, bar: tqdm):
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.bar.update(input_ids.shape[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
