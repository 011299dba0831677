"""`--resume_from_checkpoint`: which checkpoint a run continues from, and whether it is complete.

The Trainer writes a checkpoint-N folder in place: the adapter, then the optimizer, scheduler and RNG states, and
`trainer_state.json` last. A process killed in between leaves a folder that looks like a checkpoint but cannot be
resumed. So `trainer_state.json` is the checkpoint's commit mark: a folder is complete when it holds a readable
adapter (`adapter_model.safetensors`, `adapter_config.json`) and a `trainer_state.json` that parses. `last` takes the
newest complete checkpoint and names each incomplete one it passes over; an incomplete folder named explicitly is
refused with the newest complete one as the fix.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from .errors import UsageError
from .printing import say

TRAINER_STATE = "trainer_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def problem(path: str) -> Optional[str]:
    """Why `path` is not a complete checkpoint of an ID-LoRA adapter, or None when it is."""
    from safetensors import safe_open

    from idlora_trl.indices import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    missing = [name for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, TRAINER_STATE)
               if not os.path.isfile(os.path.join(path, name))]
    if missing:
        return f"no {', no '.join(missing)}"
    for name in (ADAPTER_CONFIG, TRAINER_STATE):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as handle:
                json.load(handle)
        except (OSError, ValueError):
            return f"{name} is not valid JSON"
    try:
        with safe_open(os.path.join(path, ADAPTER_WEIGHTS), framework="pt") as handle:
            handle.keys()
    except Exception:  # safetensors raises several types for a damaged file
        return f"{ADAPTER_WEIGHTS} is not a readable safetensors file"
    return None


def checkpoints(folder: str) -> list[str]:
    """The checkpoint-N folders of `folder`, newest (largest N) first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder)
             if (m := CHECKPOINT.match(name)) and os.path.isdir(os.path.join(folder, name))]
    return [os.path.join(folder, name) for _, name in sorted(found, reverse=True)]


def newest_complete(folder: str) -> tuple[Optional[str], list[tuple[str, str]]]:
    """`(the newest complete checkpoint or None, [(newer incomplete checkpoint, why), ...])`."""
    passed = []
    for path in checkpoints(folder):
        why = problem(path)
        if why is None:
            return path, passed
        passed.append((path, why))
    return None, passed


def resolve_checkpoint(training) -> Optional[str]:
    """`--resume_from_checkpoint`: a checkpoint directory, or `last`/`true` for the newest complete one in
    `--output_dir`. Checked before anything loads (the resumed run reuses the adapter's indices)."""
    value = training.resume_from_checkpoint
    if value in (None, "", False):
        return None
    if str(value).lower() in ("true", "last"):
        found, passed = newest_complete(training.output_dir)
        for path, why in passed:
            say(f"--resume_from_checkpoint {value}: passing over the incomplete {path} ({why}: its write was "
                  "interrupted)")
        if found is None:
            incomplete = f"; incomplete: {', '.join(f'{p} ({w})' for p, w in passed)}" if passed else ""
            raise UsageError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in --output_dir "
                             f"{training.output_dir!r} (checkpoints are written with --save_steps N){incomplete}")
        value = found
    if not os.path.isdir(value):
        raise UsageError(f"--resume_from_checkpoint {value!r} does not exist")
    why = problem(value)
    if why is not None:
        folder = os.path.dirname(os.path.abspath(value))
        complete, _ = newest_complete(folder)
        fix = (f"resume from {complete} (the newest complete checkpoint there), or with `last`" if complete else
               "checkpoints are the checkpoint-N folders that --save_steps N writes into --output_dir")
        raise UsageError(f"--resume_from_checkpoint {value!r} is not a complete checkpoint of an adapter ({why}); "
                         f"{fix}")
    training.resume_from_checkpoint = value
    return value
