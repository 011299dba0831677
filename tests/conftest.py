"""The test suite's shared fixtures: random tokens, a tiny model saved to disk, test plugins registered for one
test, and a check that no test leaves a plugin registered. (Shared helpers are in `helpers.py`.)"""

import contextlib

import pytest
import torch
from helpers import VOCAB, ClusteringCounter, registered

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


@pytest.fixture
def register_plugin():
    """`register_plugin(plugin, name=None)` registers `plugin` with the project's plugin manager and returns it;
    every plugin so registered is unregistered when the test ends, passed or failed."""
    with contextlib.ExitStack() as stack:
        yield lambda plugin, name=None: stack.enter_context(registered(plugin, name))


@pytest.fixture
def clustering_counter(register_plugin) -> ClusteringCounter:
    """A registered `ClusteringCounter`: `clustering_counter.modules` lists the modules clustered during the test."""
    return register_plugin(ClusteringCounter())


@pytest.fixture(autouse=True)
def _no_plugin_left_registered():
    """After each test, the plugin manager (if started) holds only the built-in and installed plugins: a test
    plugin left registered would change every later test's clustering. Never starts the manager."""
    yield
    from idlora_trl.plugins import get_plugin_manager

    if not get_plugin_manager.cache_info().currsize:
        return
    manager = get_plugin_manager()
    installed = {id(plugin) for plugin, _ in manager.list_plugin_distinfo()}
    left = {f"{name} ({type(plugin).__name__})": plugin for name, plugin in manager.list_name_plugin()
            if plugin is not None and not name.startswith("idlora_trl.builtin.") and id(plugin) not in installed}
    for plugin in left.values():
        manager.unregister(plugin)  # the next tests start clean
    assert not left, f"the test left plugins registered: {sorted(left)}"
