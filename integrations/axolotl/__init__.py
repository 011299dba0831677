"""Axolotl integration: `adapter: idlora` through Axolotl's plugin adapter hooks.

`plugins: [idlora_trl.integrations.axolotl.IDLoRAPlugin]` in an Axolotl config. The names below are loaded on
first use, so importing this package needs no Axolotl (the plugin module itself does).
"""

_LAZY = {"IDLoRAPlugin": "plugin", "IDLoRAArgs": "args", "IDLoRABlock": "args"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IDLoRAArgs", "IDLoRABlock", "IDLoRAPlugin"]
