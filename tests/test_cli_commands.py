"""The `idlora-trl` command line: `count` on the meta device, the demo on the real model. (Bad input:
test_cli_errors.py; training: test_cli_training.py.)"""

from pathlib import Path

import pytest
from helpers import smollm2_or_skip

from idlora_trl_app.cli import main


def test_count_preset_prints_paper_table_3(capsys):
    main(["count", "llama-3.2-3b", "--idlora_r", "128", "--lora_r", "32"])
    out = capsys.readouterr().out
    assert "| ID-LoRA r=128 | 24,797,696 | 0.77% |" in out
    assert "| LoRA r=32 | 48,627,712 | 1.49% |" in out
    assert "| down_proj | 28 | 3072 x 8192 | 98,432 | 360,448 |" in out


def test_count_reads_a_config_file(tmp_path, capsys):
    from helpers import make_llama

    make_llama().config.save_pretrained(tmp_path)
    main(["count", str(tmp_path / "config.json"), "--idlora_r", "8", "--idlora_num_clusters", "2",
          "--lora_target_modules", "q_proj", "v_proj"])
    out = capsys.readouterr().out
    assert "| q_proj | 2 | 64 x 64 |" in out and "| v_proj | 2 | 32 x 64 |" in out
    assert "o_proj" not in out


def test_the_command_leaves_the_hub_reachable(monkeypatch):
    """Like `trl sft`, the command never switches the Hugging Face Hub off: a user's `--model_name_or_path org/name`
    or Hub `--dataset_name` downloads. Only the tests (helpers.py) and CI (.ci/run) set the offline variables."""
    import os

    import idlora_trl_app.cli as cli

    offline = {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"}
    for name in offline:
        monkeypatch.delenv(name, raising=False)
    seen: dict = {}
    monkeypatch.setattr(cli, "run", lambda command, argv: seen.update(os.environ, command=command))
    cli.main(["count", "llama-3-8b"])
    assert seen.get("command") == "count" and not offline & seen.keys(), sorted(offline & seen.keys())


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("sft", "dpo", "decompose", "count", "demo"))


def test_every_command_is_a_module_in_trls_shape():
    """Like `trl/scripts/sft.py`: each command's module has a usage docstring, `main` and
    `make_parser(subparsers=None)`, which builds the parser alone or adds it to a top-level parser's subparsers, as
    `trl`'s own command does."""
    import argparse

    from idlora_trl_app.cli import COMMANDS, command_module
    from idlora_trl_app.cli.arguments import command_parser_class

    top = argparse.ArgumentParser(prog="idlora-trl")
    subparsers = top.add_subparsers(dest="command", parser_class=command_parser_class())
    for name in COMMANDS:
        module = command_module(name)
        assert f"idlora-trl {name}" in module.__doc__ and callable(module.main)
        alone, added = module.make_parser(), module.make_parser(subparsers)
        assert alone.prog == added.prog == f"idlora-trl {name}" and alone.description == added.description
    assert list(subparsers.choices) == list(COMMANDS)
    _, training, *_ = subparsers.choices["dpo"].parse_args_and_config(["--max_steps", "3"])
    assert (training.max_steps, training.beta) == (3, 0.1)


@pytest.mark.slow
def test_demo_on_smollm2(tmp_path, capsys):
    smollm2_or_skip()
    main(["demo", "--output_dir", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert "ID-LoRA injected into 210 modules" in out
    assert "At step 0 (B = 0) the model is unchanged: True" in out
    assert "Paris" in out
    assert "without clustering; logits identical: True" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()



PROBE = """
import os, resource, sys
{argv}
import {module}
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB: 16,384 pages of 4 KiB
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_command_backs_large_tensors_with_huge_pages():
    """A process started as `idlora-trl` gets THP_MEM_ALLOC_ENABLE=1 before PEFT's import allocates (a user's script
    importing idlora_trl does not, and a user's own value wins), and its large tensors then fault in far fewer pages
    (idlora_trl_app/startup.py). Real processes: PyTorch reads the variable once per process. The setting is checked on
    every machine; the page faults only where the kernel's mode makes them the setting's doing (`[madvise]`: under
    `[always]` every process gets huge pages, under `[never]` none)."""
    import os
    import subprocess
    import sys

    from idlora_trl_app.startup import kernel_offers_huge_pages

    def probe(argv: str, module: str, **env) -> tuple[str, int]:
        environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
        out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, module=module)], capture_output=True,
                             text=True, env=environ, timeout=300, check=True).stdout.split()
        return out[0], int(out[1])

    command = "sys.argv[0] = os.path.join(os.path.dirname(sys.executable), 'idlora-trl')"
    app = "idlora_trl_app.cli"  # what the console script imports
    (value, faults), (user_value, user_faults) = probe(command, app), probe("", "idlora_trl")  # command, user script
    assert probe("", app)[0] == "None"  # a user's script importing the app's modules (the examples do) neither
    assert user_value == "None" and value == ("1" if kernel_offers_huge_pages() else "None")
    assert probe(command, app, THP_MEM_ALLOC_ENABLE="0")[0] == "0"
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        mode = "(not readable)"
    if "[madvise]" not in mode:
        pytest.skip(f"page faults not compared: the kernel's huge-page mode is {mode.strip()}, not [madvise]")
    assert user_faults >= 16384 and faults * 4 < user_faults, (faults, user_faults)
