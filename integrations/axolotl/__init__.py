"""Axolotl integration: `adapter: idlora` through Axolotl's plugin adapter hooks."""
