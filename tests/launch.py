"""Launching the rank scripts of tests/distributed/ with `torchrun` (2 processes, CPU, gloo), bounded in time,
and the hash by which ranks and tests compare index tables.

Used by tests/test_distributed.py and tests/test_cli_distributed.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).parent / "distributed"
RUN_TIMEOUT = 240  # seconds per launch; a launch takes 10-30 s on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    def __init__(self, returncode: int, seconds: float, log: str) -> None:
        self.returncode, self.seconds, self.log = returncode, seconds, log

    def tail(self) -> str:
        return "\n".join(line for line in self.log.splitlines() if "Warning" not in line
                         and "return func(" not in line and "warnings.warn(" not in line)[-8000:]


def torchrun(script: str, *args: str, log: Path, nodes: int = 1, timeout: int = RUN_TIMEOUT) -> Launch:
    """2 processes: `torchrun --nproc_per_node 2`, or with `nodes=2` two torchrun agents of one process each
    that meet through the c10d rendezvous, as two nodes would."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    port = free_port()
    if nodes == 1:
        agents = [["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]]
    else:
        agents = [["--nnodes", str(nodes), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                   "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"test-{port}"]] * nodes
    logs = [log.with_name(f"{log.name}.{i}.log") for i in range(len(agents))]
    start = time.monotonic()
    procs = []
    for agent, path in zip(agents, logs):
        with open(path, "w") as sink:  # files, not pipes: a full pipe would stall one agent and so both
            procs.append(subprocess.Popen(
                ["timeout", "-k", "15", str(timeout), sys.executable, "-m", "torch.distributed.run", *agent,
                 str(SCRIPTS / script), *args], env=env, stdout=sink, stderr=subprocess.STDOUT))
    codes = [proc.wait(timeout=timeout + 60) for proc in procs]
    seconds = time.monotonic() - start
    return Launch(next((c for c in codes if c != 0), 0), seconds, "\n".join(p.read_text() for p in logs))


def indices_hash(indices: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(indices):
        digest.update(name.encode())
        digest.update(indices[name].to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()
