"""Checkpoints and resume in one process: `--save_steps N` writes checkpoints holding the adapter with its index
tables, and `--resume_from_checkpoint` continues from one without clustering again and ends with the adapter of
the uninterrupted run. (Two ZeRO-3 ranks: test_cli_distributed.py.)"""

import re

import pytest
import torch
from safetensors.torch import load_file

from idlora_trl_app.cli import main
from idlora_trl.hookspecs import hookimpl
from idlora_trl.plugins import get_plugin_manager

RUN = ["--idlora_r", "8", "--idlora_num_clusters", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
       "--max_steps", "4", "--max_train_samples", "32", "--eval_samples", "0", "--learning_rate", "1e-2"]


class CountClustering:
    """Counts the modules clustered (leaves the answer to the built-in strategies)."""

    calls = 0

    @hookimpl(tryfirst=True)
    def idlora_select_rows(self, weight, module_name, config):
        self.calls += 1


@pytest.fixture
def clustering():
    counter = CountClustering()
    get_plugin_manager().register(counter)
    yield counter
    get_plugin_manager().unregister(counter)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    main(["sft", "--model_name_or_path", tiny_model_dir, *RUN, "--save_steps", "2", "--output_dir", str(out)])
    return out


def adapter(path) -> dict:
    return load_file(path / "adapter_model.safetensors")


def test_checkpoints_hold_the_adapter_with_its_index_tables(uninterrupted):
    for step in (2, 4):
        checkpoint = uninterrupted / f"checkpoint-{step}"
        tensors = adapter(checkpoint)
        assert sum(key.endswith(".idlora_indices") for key in tensors) == 10  # q, k, v, gate, up x 2 layers
        assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()
    final, last = adapter(uninterrupted), adapter(uninterrupted / "checkpoint-4")
    assert all(torch.equal(final[key], last[key]) for key in final)


@pytest.mark.parametrize("how", ["path", "last"])
def test_resume_does_not_cluster_and_ends_with_the_same_adapter(uninterrupted, tiny_model_dir, tmp_path, capsys,
                                                                clustering, how):
    checkpoint = uninterrupted / "checkpoint-2"
    out = tmp_path / "resumed"
    if how == "last":  # the newest checkpoint-N of --output_dir: copy checkpoint-2 alone there
        import shutil

        shutil.copytree(checkpoint, out / "checkpoint-2")
        checkpoint = out / "checkpoint-2"
    main(["sft", "--model_name_or_path", tiny_model_dir, *RUN, "--output_dir", str(out),
          "--resume_from_checkpoint", str(checkpoint) if how == "path" else "last"])
    log = capsys.readouterr().out
    assert f"clustering skipped: indices from the checkpoint {checkpoint}" in log
    assert clustering.calls == 0
    assert re.search(r"step +3/4  loss", log) and not re.search(r"step +2/4  loss", log)  # steps 3 and 4 ran here
    resumed, expected = adapter(out), adapter(uninterrupted)
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)
    at_2 = adapter(uninterrupted / "checkpoint-2")
    assert any(not torch.equal(resumed[k], at_2[k]) for k in expected if "idlora_B" in k)  # it did train on


def test_a_checkpoint_of_other_settings_is_refused(uninterrupted, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sft", "--model_name_or_path", tiny_model_dir, *RUN, "--idlora_seed", "3", "--output_dir",
              str(tmp_path), "--resume_from_checkpoint", str(uninterrupted / "checkpoint-2")])
    assert info.value.code == 2
    assert "other settings (seed: file 0 vs config 3)" in capsys.readouterr().err


# A run whose write of checkpoint-6 is interrupted: the adapter is written, then, before the optimizer state and
# trainer_state.json (written last), the process marks the moment and waits to be killed.
KILLED_WHILE_WRITING = """
import os, sys, time
from transformers import Trainer
from idlora_trl_app.cli import main
write = Trainer._save_optimizer_and_scheduler
def write_slowly(self, output_dir):
    if os.path.basename(output_dir) == "checkpoint-6" and "WRITING" in os.environ:
        open(os.environ["WRITING"], "w").close()
        time.sleep(600)
    return write(self, output_dir)
Trainer._save_optimizer_and_scheduler = write_slowly
main(sys.argv[1:])
"""
SIX = [*RUN[:RUN.index("--max_steps")], "--max_steps", "6", *RUN[RUN.index("--max_steps") + 2:], "--save_steps", "2"]


def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_newest_complete_one(tiny_model_dir, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    out, writing = tmp_path / "killed", tmp_path / "writing"
    command = [sys.executable, "-c", KILLED_WHILE_WRITING, "sft", "--model_name_or_path", tiny_model_dir, *SIX,
               "--output_dir", str(out)]
    process = subprocess.Popen(command, env=dict(os.environ, WRITING=str(writing)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not writing.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert writing.exists(), process.communicate(timeout=60)[1][-3000:] if process.poll() is not None else "timeout"
    process.send_signal(signal.SIGKILL)  # a real kill, in the middle of writing checkpoint-6
    process.wait(timeout=60)
    broken = out / "checkpoint-6"
    assert (broken / "adapter_model.safetensors").is_file() and not (broken / "trainer_state.json").exists()

    with pytest.raises(SystemExit) as info:  # named explicitly: refused, with the complete one as the fix
        main(["sft", "--model_name_or_path", tiny_model_dir, *SIX, "--output_dir", str(out),
              "--resume_from_checkpoint", str(broken)])
    assert info.value.code == 2
    assert (f"{broken}' is not a complete checkpoint of an adapter (no trainer_state.json); resume from "
            f"{out / 'checkpoint-4'}") in capsys.readouterr().err

    def run(*args: str) -> str:  # a process of its own, as the killed run
        return subprocess.run([sys.executable, "-m", "idlora_trl_app.cli", "sft", "--model_name_or_path",
                               tiny_model_dir, *SIX, *args], capture_output=True, text=True, timeout=600,
                              check=True).stdout

    import shutil

    reference = tmp_path / "reference"
    shutil.copytree(out / "checkpoint-4", reference / "checkpoint-4")
    log = run("--output_dir", str(out), "--resume_from_checkpoint", "last")
    assert f"passing over the incomplete {broken} (no trainer_state.json" in log
    assert f"clustering skipped: indices from the checkpoint {out / 'checkpoint-4'}" in log
    assert re.search(r"step +5/6  loss", log) and not re.search(r"step +4/6  loss", log)

    # The same resume from a copy of checkpoint-4 made before anything else touched it ends with the same adapter:
    # the kill left the complete checkpoint intact. (Against an uninterrupted run, resuming is exact on the newest
    # stack, test_resume_does_not_cluster_and_ends_with_the_same_adapter.)
    run("--output_dir", str(reference), "--resume_from_checkpoint", "last")
    resumed, expected = adapter(out), adapter(reference)
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)


def test_last_with_only_incomplete_checkpoints_names_them(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["sft", "--model_name_or_path", tiny_model_dir, *RUN, "--output_dir", str(tmp_path),
              "--resume_from_checkpoint", "last"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint-N folder" in err and f"{tmp_path / 'checkpoint-2'} (no adapter_model" in err
