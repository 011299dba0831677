"""The `idlora-trl` command itself as one rank of a distributed launch (ZeRO-3 through `--deepspeed`).

    torchrun --nproc_per_node 2 tests/distributed/cli.py OUT sft --deepspeed CONFIG --model DIR ...

Runs `idlora_trl_app.cli.main(argv)` unchanged, with two additions of the test's own: DeepSpeed's 40 s shm-op
build is skipped, and an observer plugin records what the decomposition saw (whether each weight was
partitioned outside its gather context) and the index tables after injection. Writes OUT/cli_rank{R}.json.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from common import WeightContextProbe, hookimpl, indices_hash, write_json


class IndexRecorder:
    def __init__(self) -> None:
        self.hashes: list[str] = []

    @hookimpl
    def idlora_report(self, model, adapter_name, config, timings):
        from idlora_trl.skeleton import idlora_layers

        self.hashes.append(indices_hash({name: layer.idlora_indices[adapter_name]
                                         for name, layer in idlora_layers(model)}))


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import torch.distributed as dist

    from idlora_trl_app.cli import main as cli_main
    from idlora_trl.plugins import get_plugin_manager

    probe, recorder = WeightContextProbe(), IndexRecorder()
    get_plugin_manager().register(probe, name="test-probe")
    get_plugin_manager().register(recorder, name="test-indices")
    rank = int(os.environ["RANK"])
    try:
        cli_main(argv)
    finally:
        write_json(out / f"cli_rank{rank}.json", {
            "rank": rank, "weight_contexts": probe.records, "indices_hashes": recorder.hashes,
            "process_group_left": not dist.is_initialized()})


if __name__ == "__main__":
    main()
