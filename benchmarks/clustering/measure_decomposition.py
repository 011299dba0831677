"""Decomposition time and memory per rank, with 1 or N ranks (a measurement, not a test).

    python -m benchmarks.clustering.measure_decomposition OUT_DIR                         # 1 process, plain
    torchrun --nproc_per_node 2 -m benchmarks.clustering.measure_decomposition OUT_DIR  # plain DDP, 2 ranks
    torchrun --nproc_per_node 2 -m benchmarks.clustering.measure_decomposition OUT_DIR --zero3
    torchrun --nproc_per_node 1 -m benchmarks.clustering.measure_decomposition OUT_DIR --zero3

(from the repository root; `benchmarks/clustering/ranks.py` launches the last two for the clustering section.)

Model: the embedded SmolLM2-135M-Instruct (`--model smollm2`, default; 210 linear modules with all-linear), or
any checkpoint path. Under `--zero3` it is loaded by `from_pretrained` inside `zero.Init` (partitioned), and the
DeepSpeed plugin gathers one weight at a time. Writes OUT_DIR/rank{R}.json with:
- `decomposition_s`: the core's own timing of the decomposition (all modules, gather + cluster + sync);
- `select_rows_s`, `select_rows_cpu_s`, `modules_clustered`: wall and CPU time this rank spent clustering, and
  how many modules it clustered (CPU time does not depend on what else runs on the machine);
- `peak_gathered_bytes`: the most bytes of gathered weights alive at once inside the weight contexts;
- `rss_before_mb`, `rss_peak_during_mb`: resident memory before `get_peft_model` and its peak during it
  (sampled every 2 ms), `rss_after_10_25_50_75_100pct_mb`: resident memory after 10 %, 25 %, ... of this
  rank's modules were clustered, `ru_maxrss_mb`: the process's peak over its whole life (loading included);
- `module_cpu_s`: CPU seconds of each module this rank clustered; with one rank, `replayed_s` replays them
  for 2, 4 and 8 ranks: the clustering time of the core's round-robin deal under ZeRO-3 (each group of
  `world` modules waits for its slowest: the gathers are collectives), of the same with the modules dealt
  largest first, and without per-group waits (plain DDP) - free of the noise of a shared machine.
`--balanced` deals the modules largest first (a proposed change to the core's round-robin order, patched in).
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.distributed import CPU_CONFIG, WeightContextProbe, hookimpl, init_deepspeed, shutdown


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, rss_mb(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def stop(self) -> float:
        self.running = False
        self.join()
        return max(self.peak, rss_mb())


class Timings:
    def __init__(self) -> None:
        self.report: dict = {}
        self.select_rows_s = self.select_rows_cpu_s = 0.0
        self.modules: list[str] = []
        self.rss_after_module: list[float] = []
        self.module_cpu_s: dict[str, float] = {}

    @hookimpl(wrapper=True)
    def idlora_select_rows(self, weight, module_name, config):
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return (yield)
        finally:
            self.select_rows_s += time.perf_counter() - start
            self.select_rows_cpu_s += time.thread_time() - cpu
            self.module_cpu_s[module_name] = time.thread_time() - cpu
            self.modules.append(module_name)
            self.rss_after_module.append(rss_mb())

    @hookimpl
    def idlora_report(self, model, adapter_name, config, timings):
        self.report = dict(timings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--zero3", action="store_true")
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--num-clusters", type=int, default=4)
    parser.add_argument("--balanced", action="store_true",
                        help="deal the modules to the ranks largest first (a proposed core change, patched in here)")
    args, _ = parser.parse_known_args()
    out = Path(args.out)

    import json

    import torch
    import torch.distributed as dist

    distributed = "RANK" in os.environ
    if args.zero3:
        init_deepspeed()
    elif distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from idlora_trl import IDLoRAConfig
    from idlora_trl.plugins import get_plugin_manager

    path = args.model
    if path == "smollm2":
        from idlora_trl_app.smollm2 import smollm2_path

        path = smollm2_path()
    keep_alive = None
    if args.zero3:
        from transformers.integrations import HfDeepSpeedConfig

        ds_config = json.loads(Path(CPU_CONFIG).read_text())
        ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                         train_batch_size=world, gradient_clipping=1.0)
        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841
    load_start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load_s = time.perf_counter() - load_start
    local_param_bytes = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                            for p in model.parameters())

    if args.balanced:
        from idlora_trl import skeleton

        original = skeleton.decompose_layers

        def largest_first(layers, adapter_name, config):
            order = sorted(layers, key=lambda item: -item[1].out_features * item[1].in_features)
            return original(order, adapter_name, config)

        skeleton.decompose_layers = largest_first

    manager = get_plugin_manager()
    probe, timings = WeightContextProbe(), Timings()
    manager.register(probe, name="measure-probe")
    manager.register(timings, name="measure-timings")
    if distributed:
        dist.barrier()
    rss_before = rss_mb()
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    model = get_peft_model(model, IDLoRAConfig(r=args.r, num_clusters=args.num_clusters, task_type="CAUSAL_LM"))
    wall = time.perf_counter() - start
    rss_peak = sampler.stop()
    largest = max(r["nbytes"] for r in probe.records)
    trace = timings.rss_after_module
    quartiles = [round(trace[max(0, int(len(trace) * q) - 1)], 1) for q in (0.1, 0.25, 0.5, 0.75, 1.0)]
    write_json(str(out / f"rank{rank}.json"), {
        "rank": rank, "world": world, "zero3": args.zero3, "model": path, "torch_threads": torch.get_num_threads(),
        "load_s": load_s, "get_peft_model_s": wall, "decomposition_s": timings.report.get("decomposition_s"),
        "modules": timings.report.get("modules"), "modules_clustered": len(timings.modules),
        "select_rows_s": timings.select_rows_s, "select_rows_cpu_s": timings.select_rows_cpu_s,
        "balanced": args.balanced, "loadavg_after": os.getloadavg(), "rss_after_10_25_50_75_100pct_mb": quartiles,
        "local_param_mb": local_param_bytes / 2**20,
        "peak_gathered_mb": probe.peak_live_bytes / 2**20, "largest_weight_mb": largest / 2**20,
        "contexts": sorted({r["context"] for r in probe.records}),
        "rss_before_mb": rss_before, "rss_peak_during_mb": rss_peak,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "module_cpu_s": timings.module_cpu_s,
        "replayed_s": replay(timings.module_cpu_s, model) if world == 1 else None,
    })


def replay(cpu_s: dict[str, float], model) -> dict:
    """Clustering time with N ranks, from one rank's per-module CPU times (gathers and sync not counted)."""
    from idlora_trl.skeleton import idlora_layers

    layers = [(name, layer.out_features * layer.in_features) for name, layer in idlora_layers(model)]
    in_order = [cpu_s[name] for name, _ in layers]
    largest_first = [cpu_s[name] for name, _ in sorted(layers, key=lambda item: -item[1])]
    result = {"one_rank": sum(in_order)}
    for world in (2, 4, 8):
        groups = lambda times: [times[i:i + world] for i in range(0, len(times), world)]  # noqa: E731
        result[f"{world}_ranks"] = {
            "zero3_round_robin": sum(max(g) for g in groups(in_order)),
            "zero3_largest_first": sum(max(g) for g in groups(largest_first)),
            "ddp_round_robin": max(sum(in_order[r::world]) for r in range(world)),
            "ideal": sum(in_order) / world,
        }
    return result


if __name__ == "__main__":
    main()
    shutdown()
