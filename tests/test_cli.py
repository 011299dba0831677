"""The `idlora-trl` command line: `count` on the meta device, the demo on the real model. (Bad input:
test_cli_errors.py; training: test_train_cli.py.)"""

import pytest
from helpers import smollm2_or_skip

from idlora_trl.cli import main


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


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("sft", "dpo", "decompose", "count", "demo"))


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
