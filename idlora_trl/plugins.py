"""The plugin manager: built-in plugins plus those installed under the entry-point group `idlora_trl`."""

from __future__ import annotations

import functools

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "idlora_trl"


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager; built on first use."""
    from . import builtin_plugins

    manager = pluggy.PluginManager("idlora_trl")
    manager.add_hookspecs(hookspecs)
    for plugin in builtin_plugins.PLUGINS:
        manager.register(plugin, name=f"idlora_trl.builtin.{plugin.name}")
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager


def selection_names() -> list[str]:
    """Every selection strategy some registered plugin implements."""
    names = get_plugin_manager().hook.idlora_selection_names()
    return sorted({name for plugin_names in names for name in plugin_names})


def check_selection(name: str) -> None:
    """Raise a clear error unless a registered plugin implements the selection strategy `name`. (`IDLoRAConfig`
    checks built-in names itself, without starting the plugin manager; other names are checked here, when
    rows are selected.)"""
    known = selection_names()
    if name not in known:
        raise ValueError(
            f"IDLoRAConfig: invalid selection={name!r}. Choose one of {known}: no installed plugin implements "
            f"{name!r} (plugins register under the entry-point group {ENTRY_POINT_GROUP!r})."
        )
