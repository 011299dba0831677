"""Placeholder: the DeepSpeed ZeRO-3 plugin (weight context) is being written."""
