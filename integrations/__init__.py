"""Integrations of idlora-trl with other tools, installed as `idlora_trl.integrations`.

They import the core (`idlora_trl`); the core never imports them. Plugins among them are registered through
the entry-point group `idlora_trl`, like any third-party plugin.
"""
