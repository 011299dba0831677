"""Shared fixtures; shared helpers (tiny models, the tokenizer) are in `helpers.py`."""

import pytest
import torch
from helpers import VOCAB

import idlora_trl  # noqa: F401  (registers ID-LoRA with PEFT)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer Llama with an in-memory BPE tokenizer and a ChatML template, saved like a real checkpoint (what
    `idlora-trl sft --model_name_or_path` reads in the CLI tests)."""
    from helpers import make_chat_llama, make_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    make_chat_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
