"""Loading the model to train: a model directory or Hub name (`--model_name_or_path`, with `trl.ModelConfig`'s dtype,
revision, attention implementation and bitsandbytes quantization), or the main job's embedded SmolLM2."""

from __future__ import annotations

import os
from typing import Optional

from .errors import UsageError, first_line


def quantization(model_args, dtype) -> dict:
    """`from_pretrained` arguments for TRL's `--load_in_4bit` / `--load_in_8bit` (bitsandbytes, QLoRA-style: the
    rows of the dequantized weights are clustered; integrations/bitsandbytes)."""
    import torch

    four, eight = getattr(model_args, "load_in_4bit", False), getattr(model_args, "load_in_8bit", False)
    if not (four or eight):
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise UsageError(f"--load_in_{'4' if four else '8'}bit needs bitsandbytes: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True) if eight else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=torch.float32 if dtype == "auto" else dtype)
    device = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def load_model(path: Optional[str], model_args=None):
    """`(model, tokenizer, label)`: a local model directory (or a cached Hub name), or the embedded SmolLM2.
    `model_args` (a `trl.ModelConfig`) gives the dtype, revision and attention implementation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        from .main_job import embedded_model

        path, label = embedded_model()
    else:
        path = os.path.expanduser(path)
        label = os.path.basename(os.path.normpath(path)) or path
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"--model_name_or_path {path!r} is not a model directory (no config.json)")
        if os.path.isfile(path):
            raise UsageError(f"--model_name_or_path {path!r} is a file; pass the model directory")
        if not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise UsageError(f"--model_name_or_path {path!r} does not exist")
    dtype = getattr(model_args, "dtype", None) or "float32"
    kwargs = dict(dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    if getattr(model_args, "attn_implementation", None):
        kwargs["attn_implementation"] = model_args.attn_implementation
    if getattr(model_args, "model_revision", "main") not in (None, "main"):
        kwargs["revision"] = model_args.model_revision
    kwargs.update(quantization(model_args, kwargs["dtype"]))
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise for a model that loads in a second
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "revision"})
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"cannot load model {path!r} (--model_name_or_path takes a model directory, or a Hub name "
                         f"this machine can download): {first_line(error)}") from error
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"the tokenizer of {path!r} has no chat template; the built-in and conversational "
                         "datasets need one")
    return model, tokenizer, label


def count_base_parameters(model) -> int:
    """Parameters of a model, partitioned (ZeRO-3: `ds_numel`) or not."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
