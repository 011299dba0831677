"""A ZeRO-3 run whose model was built before its DeepSpeed config, on a CPU without mkldnn fp16 (simulated): the
parameters keep their dtype. (The partition dtype of a model loaded under the config: test_distributed.py.)"""

import os
from importlib.resources import files
from pathlib import Path

from launch import free_port

BUILT_BEFORE_THE_CONFIG = """
import importlib, sys, torch
import deepspeed
from deepspeed.accelerator import get_accelerator
type(get_accelerator()).is_fp16_supported = lambda self: False  # a CPU without mkldnn fp16
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
from helpers import make_chat_llama, make_tokenizer
from test_trainers import CPU, sft_dataset
from trl import SFTConfig
from idlora_trl import IDLoRAConfig, IDLoRASFTTrainer
tok = make_tokenizer()
model = make_chat_llama(tok)  # before the config: not partitioned at creation
config = SFTConfig(output_dir=sys.argv[1], max_steps=2, learning_rate=1e-2, **{**CPU, "max_length": 32},
                   deepspeed=sys.argv[2])
trainer = IDLoRASFTTrainer(model, args=config, train_dataset=sft_dataset(), processing_class=tok,
                           peft_config=IDLoRAConfig(r=8, num_clusters=2, task_type="CAUSAL_LM"))
trainer.train()
print(sorted({str(p.ds_tensor.dtype) for p in trainer.model_wrapped.module.parameters()}))
"""


def test_zero3_model_built_before_the_config_stays_float32_without_fp16(tmp_path):
    """A user's model built outside `zero.Init`: `deepspeed.initialize` partitions it with `Init(module=...,
    dtype=its dtype)`, which on a CPU without mkldnn fp16 names bf16, but existing parameters are not cast. One
    process of its own (world of one), so no DeepSpeed or accelerate state reaches the other tests."""
    import subprocess
    import sys

    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", PYTHONPATH=str(Path(__file__).parent))
    config = str(files("idlora_trl.integrations.deepspeed") / "zero3_cpu_fp32.json")
    result = subprocess.run([sys.executable, "-c", BUILT_BEFORE_THE_CONFIG, str(tmp_path), config], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['torch.float32']", result.stdout[-2000:]
