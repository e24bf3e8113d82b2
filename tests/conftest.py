"""Shared test setup: Triton runs through its CPU interpreter when no GPU is present."""

import pytest
import torch

import triton_interpreter  # noqa: F401  (must precede any Triton import)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
