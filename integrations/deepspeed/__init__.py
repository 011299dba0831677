"""DeepSpeed ZeRO-3 support: the weight-gathering plugin, configs and launch examples."""
