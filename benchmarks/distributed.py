"""What a rank process on the CPU needs, shared by `clustering/measure_decomposition.py` and the rank scripts of
tests/distributed/ (which import it from here): offline Hugging Face libraries and DeepSpeed's CPU accelerator (set
on import, before DeepSpeed is), DeepSpeed's initialisation over gloo, a clean exit, and `WeightContextProbe`.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.resources import files

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from idlora_trl.hookspecs import hookimpl  # noqa: E402  (the library imports the Hugging Face ones: after the above)

CPU_CONFIG = str(files("idlora_trl.integrations.deepspeed") / "zero3_cpu_fp32.json")


def init_deepspeed() -> tuple[int, int]:
    """`deepspeed.init_distributed` over gloo, without the 40 s JIT build of DeepSpeed's shm op."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """End the process group on every rank, then the process, without the interpreter's teardown.

    Left alive, gloo's threads can make one rank abort at exit ("terminate called without an active exception"),
    which fails the launch. Destroying the group is not always enough: after a DeepSpeed run that resumed from a
    checkpoint, one rank in a few still aborted at exit on 2 loaded cores, after it had written all it saw. What
    the rank scripts test is written before this point (files renamed into place), so they leave with os._exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class WeightContextProbe:
    """Instrumentation only: wraps whatever context the other plugins return and records, per module, the owner
    rank, the context's type, what `__enter__` returned (its shape, or None), what `module.weight` looked like
    inside (full shape or not), and the most bytes of gathered weights alive at once on this rank (the returned
    tensor, else `module.weight` when it is whole). With `keep=True` it also keeps a copy of every tensor
    `__enter__` returned, in `gathered` (module name -> tensor). It never changes the weight or the answer."""

    def __init__(self, keep: bool = False) -> None:
        self.records: list[dict] = []
        self.gathered: dict = {}
        self.keep = keep
        self.live_bytes = 0
        self.peak_live_bytes = 0

    @hookimpl(wrapper=True)
    def idlora_weight_context(self, module, module_name, owner_rank):
        context = yield
        probe = self

        class Recorded:
            def __enter__(self_inner):
                value = context.__enter__()
                weight = module.weight
                full_shape = list(getattr(weight, "ds_shape", weight.shape))
                held = value if value is not None else weight if list(weight.shape) == full_shape else None
                nbytes = 0 if held is None else held.numel() * held.element_size()
                probe.live_bytes += nbytes
                probe.peak_live_bytes = max(probe.peak_live_bytes, probe.live_bytes)
                self_inner.nbytes = nbytes
                status = getattr(weight, "ds_status", None)
                probe.records.append({
                    "module": module_name, "owner": owner_rank, "context": type(context).__name__,
                    "returned": None if value is None else list(value.shape),
                    "shape_inside": list(weight.shape), "full_shape": full_shape, "nbytes": nbytes,
                    "status": None if status is None else status.name,
                })
                if probe.keep and value is not None:
                    probe.gathered[module_name] = value.detach().clone()
                return value

            def __exit__(self_inner, *exc):
                probe.live_bytes -= self_inner.nbytes
                return context.__exit__(*exc)

        return Recorded()
