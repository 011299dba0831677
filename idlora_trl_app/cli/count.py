"""`idlora-trl count`: the parameter table of ID-LoRA against LoRA and DoRA for a model directory, a config.json or
a known architecture, built on the meta device (no weights are read).

```bash
idlora-trl count llama-3.2-3b --idlora_r 128 --lora_r 32   # the paper's Table 3
idlora-trl count DIR/config.json --lora_target_modules q_proj v_proj
```
"""

from __future__ import annotations

from idlora_trl.counting import PRESETS

from .arguments import adapter_parser

DESCRIPTION = "Parameter table of ID-LoRA against LoRA and DoRA, on the meta device."


def main(idlora_args, target_args, rest):
    """`rest.model`: the positional argument (a model directory, a config.json or a preset name)."""
    from peft import get_peft_model

    from idlora_trl.counting import count_parameters, format_parameter_table, meta_model

    from .adapter_config import idlora_config
    from .errors import UsageError, first_line

    config = idlora_config(idlora_args, target_args.lora_target_modules)
    try:
        model = meta_model(rest.model)
        peft_model = get_peft_model(model, config)
    except ValueError as error:
        raise UsageError(first_line(error)) from error
    print(format_parameter_table(count_parameters(peft_model, lora_r=target_args.lora_r)))


def make_parser(subparsers=None, prog: str | None = None):
    parser = adapter_parser("count", (), dict(idlora_r=128), DESCRIPTION, subparsers, prog)
    parser.add_argument("model", help=f"a model directory, a config.json, or one of {', '.join(PRESETS)}")
    return parser
