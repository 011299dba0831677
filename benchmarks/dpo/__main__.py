"""`python -m benchmarks.dpo`: the DPO protocol's runs (resumable) and its report, docs/benchmarks/dpo.{json,md}.

    python -m benchmarks.dpo --threads 1 --methods LoRA          # one worker per method, side by side
    python -m benchmarks.dpo                                     # then: every stored run into the report
    python -m benchmarks.dpo --render                            # the report again, from its JSON
    python -m benchmarks.dpo --smoke --out /tmp/dpo.md           # toy sizes in a scratch folder (seconds; tests)

A worker started with `--methods` writes a report of its own methods only; the last invocation, with every
method, trains nothing that is stored and writes the whole report.
"""
from __future__ import annotations

import argparse
import os
import sys

from benchmarks.common import (STORED, Clock, log, machine_info, read_json, set_threads, smollm2, tiny_llama,
                               tiny_tokenizer, write_json)
from benchmarks.dpo.report import render
from benchmarks.dpo.runs import DPOBench, splits
from benchmarks.quality.measure import grid_search, run_test_seeds
from benchmarks.quality.runs import named_methods
from idlora_trl_app.defaults import DEFAULT_TARGETS, DPO_DEFAULTS

RUNS, DOC = os.path.join(STORED, "dpo-runs"), os.path.join(STORED, "dpo.md")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dpo", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="LoRA,ID-LoRA (paper)", help=f"from: {', '.join(named_methods(8))}")
    p.add_argument("--grid", default="7.5e-4,1.5e-3,3e-3,6e-3,1.2e-2", help="learning rates, log-spaced")
    p.add_argument("--grid-seeds", type=int, default=1, help="seeds per rate (a DPO run is ~5 min on 2 cores)")
    p.add_argument("--test-seeds", type=int, default=3)
    p.add_argument("--max-extend", type=int, default=2, help="grid steps added beyond an edge that wins")
    p.add_argument("--p", type=int, default=8, help="LoRA rank p; ID-LoRA gets 4p")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--minutes", type=float, default=None, help="start no new run after this many minutes")
    p.add_argument("--runs", default=RUNS)
    p.add_argument("--work-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "idlora-trl", "dpo"))
    p.add_argument("--render", action="store_true", help="only write the report from the stored JSON")
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama, 2 steps, in a scratch folder")
    p.add_argument("--out", default=DOC, help="the Markdown report (its JSON beside it)")
    return p


def measure(args) -> dict:
    set_threads(args.threads)
    data, d = splits(), dict(DPO_DEFAULTS)
    if args.smoke:
        import tempfile

        scratch = tempfile.mkdtemp(prefix="idlora-dpo-smoke-")
        args.runs, args.work_dir, args.p, args.grid_seeds, args.test_seeds = scratch, scratch, 2, 1, 2
        args.grid, args.max_extend, d["max_steps"], d["per_device_train_batch_size"] = "1e-3,2e-3", 0, 2, 4
        data = {k: v[:8] for k, v in data.items()}
        tokenizer = tiny_tokenizer([m["content"] for rows in data.values() for r in rows
                                    for key in ("prompt", "chosen", "rejected") for m in r[key]])
        base, label = tiny_llama(vocab=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id), "tiny Llama"
    else:
        base, tokenizer, label = smollm2()
    setup = dict(model=label, targets=DEFAULT_TARGETS.split(","), p=args.p, steps=d["max_steps"],
                 batch=d["per_device_train_batch_size"], scheduler=d["lr_scheduler_type"], warmup=d["warmup_steps"],
                 max_length=d["max_length"], beta=d["beta"], loss_type=list(d["loss_type"]), data="safety-v1")
    bench = DPOBench(base, tokenizer, data, setup, args.runs, args.work_dir, log=log)
    clock, grid = Clock(None if args.minutes is None else 60 * args.minutes), sorted(map(float, args.grid.split(",")))
    named, out = named_methods(args.p), dict(setup=setup, machine=machine_info(), grid=grid, methods={},
                                             grid_seeds=args.grid_seeds, test_seeds=args.test_seeds,
                                             sizes={k: len(v) for k, v in data.items()})
    from idlora_trl_app.data import refusal_prompts
    from idlora_trl_app.evaluation import refusal_rates

    base_rates = refusal_rates(base.eval(), tokenizer, refusal_prompts("test"), max_new_tokens=24)
    out["base"] = {kind: [r.correct, r.total] for kind, r in base_rates.items()}  # before any training
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        kind, settings = named[name]
        lr, curve = grid_search(bench, kind, settings, grid, args.grid_seeds, grid[1] / grid[0], args.max_extend,
                                clock, score=lambda r: r["validation"]["loss"])
        runs = run_test_seeds(bench, kind, settings, lr, args.test_seeds, clock) if lr else []
        out["methods"][name] = dict(lr=lr, trainable=runs[0]["trainable"] if runs else None,
                                    curve={str(k): [r["validation"] for r in v] for k, v in sorted(curve.items())},
                                    test=[dict(seed=r["seed"], **r["test"]) for r in runs])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    path = os.path.splitext(args.out)[0] + ".json"
    data = read_json(path) if args.render else measure(args)
    if not args.render:
        write_json(path, data)
    with open(args.out, "w") as f:
        f.write(render(data) + "\n")
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
