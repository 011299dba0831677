"""Shared fixtures; shared helpers (tiny models, the tokenizer) are in `helpers.py`."""

import pytest
import torch
from helpers import VOCAB

import idlora_trl  # noqa: F401  (registers ID-LoRA with PEFT)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
