"""Building the ID-LoRA trainer and saving its adapter. Building the trainer injects ID-LoRA; the indices come from
the checkpoint being resumed, an index file, the embedded model's index cache (filled on the first run), or
clustering."""

from __future__ import annotations

import os
import time
from typing import Optional

from .errors import UsageError, first_line
from .printing import say, seconds


def build_trainer(cls, peft_config, checkpoint: Optional[str] = None, cache: Optional[str] = None,
                  lora_r: Optional[int] = None, **kwargs):
    """`cls(peft_config=peft_config, **kwargs)`, saying where the indices came from. `cache`: the index cache's file
    for these settings (`main_job.index_cache`); `lora_r`: a LoRA rank to compare with besides the trainer's own."""
    given = peft_config.indices_path
    if checkpoint is not None:
        peft_config.indices_path = checkpoint  # its adapter holds the tables: resuming never clusters again
    if checkpoint is not None or given is not None:
        cache = None
    reuse = cache is not None and os.path.isfile(cache)
    if reuse:
        peft_config.indices_path = cache
    start = time.perf_counter()
    trainer = _make_trainer(cls, peft_config=peft_config, **kwargs)
    elapsed = seconds(start)
    if checkpoint is not None:
        how = f"clustering skipped: indices from the checkpoint {checkpoint}"
    elif given:
        how = f"clustering skipped: indices from {given}"
    elif reuse:
        how = f"clustering skipped: indices cached by an earlier run, {cache} (--no_index_cache to redo it)"
    else:
        how = "clustering included"
        if cache is not None:
            from idlora_trl import get_indices, save_indices

            staging = f"{cache}.{os.getpid()}.tmp"
            save_indices(staging, get_indices(trainer.model), peft_config.decomposition_spec())
            os.replace(staging, cache)  # atomic: concurrent runs never read half a file
            how += f"; indices cached in {cache} for later runs"
    say(f"ID-LoRA set up in {elapsed} ({how})")
    if lora_r:  # the trainer's table compares with LoRA at r/4; the user asked for another rank
        from idlora_trl import count_parameters, format_parameter_table

        say(f"Against LoRA at r={lora_r}:\n{format_parameter_table(count_parameters(trainer.model, lora_r=lora_r))}")
    return trainer


def _make_trainer(cls, **kwargs):
    """Build the trainer (this injects ID-LoRA); settings that do not fit the model are one-line errors."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:  # e.g. num_clusters * r > d_out, no module matched, index file
        raise UsageError(first_line(error)) from error


def save_adapter(trainer, output_dir: str) -> None:
    """Save the adapter (and tokenizer). The indices travel inside the adapter's weights, so the saved config
    does not point at an index file that may be absent where the adapter is loaded."""
    for config in trainer.model.peft_config.values():
        if getattr(config, "indices_path", None):
            config.indices_path = None
    trainer.save_model(output_dir)
    say(f"\nSaved the ID-LoRA adapter to {os.path.abspath(output_dir)}")
