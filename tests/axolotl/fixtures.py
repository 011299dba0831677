"""Fixtures and steps shared by the Axolotl tier's test files: the tiny model's workspace, Axolotl's plugin manager
(restored after each test), a real `axolotl train`, and in-process validation of a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_axolotl as tiny

TRAIN_TIMEOUT = 900  # one `axolotl train` takes about a minute on 2 shared cores


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl")
    model_dir = tiny.write_tiny_model(root / "tiny")
    tiny.write_jsonl(model_dir / "sft.jsonl", tiny.sft_rows())
    tiny.write_jsonl(model_dir / "dpo.jsonl", tiny.dpo_rows())
    tiny.write_jsonl(model_dir / "dpo_chat.jsonl", tiny.dpo_chat_rows())
    return root, model_dir


@pytest.fixture
def plugin_manager():
    """Axolotl's process-wide PluginManager, restored afterwards (registrations would leak between tests)."""
    from axolotl.integrations.base import PluginManager

    manager = PluginManager.get_instance()
    saved_plugins, saved_cfg = dict(manager.plugins), manager.cfg
    yield manager
    manager.plugins.clear()
    manager.plugins.update(saved_plugins)
    manager.cfg = saved_cfg


def train(workspace, name: str, cfg: dict) -> tuple[Path, str]:
    root, _ = workspace
    config = tiny.write_config(root / f"{name}.yml", cfg)
    code, output, seconds = tiny.run_axolotl_train(config, root / f"{name}.log", timeout=TRAIN_TIMEOUT)
    print(f"axolotl train {name}: exit {code} in {seconds:.0f} s")
    if code != 0:
        lines = [line for line in output.splitlines() if "is ignored: it is neither" not in line]
        pytest.fail(f"`axolotl train` ({name}) exited {code} after {seconds:.0f} s:\n" + "\n".join(lines[-60:]))
    return root / name / "out", output


def validate(workspace, plugin_manager, **overrides):
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    root, model_dir = workspace
    cfg = DictDefault(tiny.base_config(model_dir, root / "unit", **overrides))
    prepare_plugins(cfg)  # before validation: the plugin makes `adapter: idlora` known
    return validate_config(cfg)
