"""The `idlora-trl` command line: `count` on the meta device, bad input, and the demo on the real model."""

import json

import pytest
from helpers import smollm2_or_skip

from idlora_trl.cli import main


def test_count_preset_prints_paper_table_3(capsys):
    main(["count", "llama-3.2-3b", "--r", "128", "--lora-r", "32"])
    out = capsys.readouterr().out
    assert "| ID-LoRA r=128 | 24,797,696 | 0.77% |" in out
    assert "| LoRA r=32 | 48,627,712 | 1.49% |" in out
    assert "| down_proj | 28 | 3072 x 8192 | 98,432 | 360,448 |" in out


def test_count_reads_a_config_file(tmp_path, capsys):
    from helpers import make_llama

    make_llama().config.save_pretrained(tmp_path)
    main(["count", str(tmp_path / "config.json"), "--r", "8", "--num-clusters", "2", "--target-modules",
          "q_proj,v_proj"])
    out = capsys.readouterr().out
    assert "| q_proj | 2 | 64 x 64 |" in out and "| v_proj | 2 | 32 x 64 |" in out
    assert "o_proj" not in out


@pytest.mark.parametrize("argv, message", [
    (["count", "no/such/model"], "neither a model directory, a config.json, nor one of"),
    (["count", "llama-3.2-3b", "--r", "6", "--rank-boost", "4"], "r must be divisible by rank_boost=4"),
    (["count", "llama-3.2-3b", "--r", "512", "--num-clusters", "4"], "num_clusters * r <= 1024"),
    (["count", "llama-3.2-3b", "--target-modules", "nothing_here"], "nothing_here"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_config_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(SystemExit):
        main(["count", str(path)])
    assert "cannot read a model config" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_on_smollm2(tmp_path, capsys):
    smollm2_or_skip()
    main(["demo", "--output-dir", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert "ID-LoRA injected into 210 modules" in out
    assert "At step 0 (B = 0) the model is unchanged: True" in out
    assert "Paris" in out
    assert "without clustering; logits identical: True" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
