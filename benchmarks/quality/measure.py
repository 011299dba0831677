"""Section 4's measurement: the protocol (learning-rate grid on validation, test at the chosen rates, ablations),
resumed from the stored runs, then the diagnosis."""
from __future__ import annotations

import math
import os

from benchmarks.common import STORED, Clock, log, read_json, smollm2, tiny_llama, tiny_tokenizer
from benchmarks.quality import diagnose, tasks
from benchmarks.quality.runs import Bench, Spec, named_methods, nll
from benchmarks.stats import mean
from idlora_trl_app.defaults import DEFAULT_TARGETS, SFT_DEFAULTS  # the main job's settings


def add_arguments(parser) -> None:
    g = parser.add_argument_group("quality")
    g.add_argument("--quality-p", type=int, default=8, help="LoRA/DoRA rank p; ID-LoRA gets 4p, VeRA 32p")
    g.add_argument("--quality-steps", type=int, default=SFT_DEFAULTS["max_steps"] // 2,
                   help="optimizer steps per run (half the main job's: the protocol must fit ~3 h on 2 cores)")
    g.add_argument("--quality-batch", type=int, default=SFT_DEFAULTS["per_device_train_batch_size"] // 2,
                   help="rows per step (half the main job's, for the same reason)")
    g.add_argument("--grid", default="2.5e-4,5e-4,1e-3,2e-3,4e-3", help="learning rates, log-spaced by a fixed factor")
    g.add_argument("--grid-seeds", type=int, default=2, help="training seeds per grid point")
    g.add_argument("--max-extend", type=int, default=2, help="grid steps added beyond an edge that wins")
    g.add_argument("--score-grid-tests", action="store_true",
                   help="score each grid run trained here on test at once (3 min at 240x8): a later sitting on "
                        "another machine then need not train seeds 0-1 of the chosen rate again (27 min each) to "
                        "score them; the rate is still chosen on validation. Only where a run trains longer than "
                        "its test takes to score: at 30x4 (2 min) it would double a line's time")
    g.add_argument("--test-seeds", type=int, default=5, help="training seeds per method at its chosen rate")
    g.add_argument("--val-per-task", type=int, default=32, help="validation items per task")
    g.add_argument("--test-per-task", type=int, default=100, help="test items per task")
    g.add_argument("--methods", default="LoRA,DoRA,VeRA,ID-LoRA",
                   help=f"methods of the main comparison, from: {', '.join(named_methods(8))}")
    g.add_argument("--ablations", default="all", help="'all', 'none' or comma-separated ablation labels")
    g.add_argument("--ablation-span", type=int, default=1, help="grid steps either side of the default's rate")
    g.add_argument("--ablation-grid-seeds", type=int, default=2,
                   help="seeds per grid point of an ablation (one seed picked rates that diverge on another)")
    g.add_argument("--ablation-seeds", type=int, default=3, help="test seeds per ablation")
    g.add_argument("--quality-dir", default=os.path.join(STORED, "quality-runs"),
                   help="one JSON per run (resumed from)")
    g.add_argument("--work-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "idlora-trl", "quality"),
                   help="saved adapters and index files (not committed)")
    g.add_argument("--quality-minutes", type=float, default=None, help="start no new run after this many minutes")
    g.add_argument("--exploration-dir",
                   default=os.path.join(STORED, "exploration"),
                   help="single-seed runs at the main job's size, shown beside the protocol's (read, not run)")
    g.add_argument("--no-diagnosis", action="store_true",
                   help="skip diagnose.py (for a worker that runs some of the methods beside another)")


def ablations(p: int, min_d_out: int) -> dict[str, dict]:
    """One setting of the default ID-LoRA changed each (k = 8 needs a lower r to fit `k r <= d_out`)."""
    r, r8 = 4 * p, min(4 * p, min_d_out // 8) // 2 * 2
    out = {"router_norm=rms (ours)": dict(router_norm="rms"), "selection=pmrc-qr (ours)": dict(selection="pmrc-qr"),
           "selection=random": dict(selection="random"), "selection=sequential": dict(selection="sequential"),
           "router=static": dict(router="static"), "rank_boost=1": dict(rank_boost=1), "k=2": dict(num_clusters=2),
           f"k=8, r={r8}": dict(num_clusters=8, r=r8)}
    if r8 != r:
        out[f"k=4, r={r8} (control for k=8)"] = dict(r=r8)
    return out


# ------------------------------------------------------------------------------------------------- run
def grid_search(bench: Bench, method: str, settings: tuple, lrs: list[float], seeds: int, factor: float,
                max_extend: int, clock: Clock, score=lambda record: nll(record, "validation"),
                score_test: bool = False) -> tuple[float | None, dict[float, list[dict]]]:
    """A validation score per rate, lower is better (default: answer NLL), extending past a winning edge;
    returns (chosen rate or None, records). `bench` is anything with `load(spec)` and `run(spec, score_test)`.
    `score_test`: a run trained here is scored on test at once, while its adapter is on this machine (the rate is
    still chosen on validation alone); a stored run is left as it is, never trained again to be scored."""
    curve: dict[float, list[dict]] = {}
    lrs = sorted(lrs)
    for extension in range(max_extend + 1):
        for lr in lrs:
            for seed in range(seeds):
                if lr in curve and len(curve[lr]) > seed:
                    continue
                fresh = bench.load(Spec(method, lr, seed, settings)) is None
                if fresh and clock.skip():
                    return None, curve
                curve.setdefault(lr, []).append(bench.run(Spec(method, lr, seed, settings), score_test and fresh))
        scores = {lr: mean(score(r) for r in records) for lr, records in curve.items()}
        best = min(scores, key=scores.get)
        ordered = sorted(curve)
        if extension == max_extend or ordered[0] < best < ordered[-1]:
            return best, curve
        lrs = [best / factor] if best == ordered[0] else [best * factor]
    return None, curve


def run_test_seeds(bench: Bench, method: str, settings: tuple, lr: float, seeds: int, clock: Clock) -> list[dict]:
    out = []
    for seed in range(seeds):
        record = bench.load(Spec(method, lr, seed, settings))
        if (record is None or "test" not in record) and clock.skip():
            break
        out.append(bench.run(Spec(method, lr, seed, settings), score_test=True))
    return out


def _min_d_out(model, targets: list[str]) -> int:
    import torch

    return min(m.out_features for n, m in model.named_modules()
               if n.split(".")[-1] in targets and isinstance(m, torch.nn.Linear))


def build_bench(args):
    """The protocol's shared model, splits and folders from the parsed arguments, and the smallest d_out targeted."""
    targets = [t.strip() for t in DEFAULT_TARGETS.split(",")]
    validation = tasks.rows("validation", per_task=args.val_per_task)
    test = tasks.rows("test", per_task=args.test_per_task)
    if args.smoke:
        train = tasks.dataset("train").select(range(24))
        texts = [m["content"] for row in train.to_list() + validation + test for m in row["prompt"] + row["completion"]]
        tokenizer = tiny_tokenizer(texts)
        base = tiny_llama(vocab=len(tokenizer), hidden=64, layers=2, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        label = "tiny Llama (smoke)"
    else:
        base, tokenizer, label = smollm2()
        train = tasks.dataset("train")
    setup = dict(model=label, targets=targets, p=args.quality_p, steps=args.quality_steps, batch=args.quality_batch,
                 scheduler=SFT_DEFAULTS["lr_scheduler_type"], warmup=SFT_DEFAULTS["warmup_steps"],
                 max_length=SFT_DEFAULTS["max_length"], data=tasks.DATA, validation=len(validation), test=len(test))
    return Bench(base, tokenizer, train.select_columns(["prompt", "completion"]), validation, test, setup,
                 args.quality_dir, args.work_dir, log=log), _min_d_out(base, targets)


def run(args, partial=None) -> dict:
    if args.smoke:
        import tempfile

        scratch = tempfile.mkdtemp(prefix="idlora-quality-smoke-")
        args.quality_dir, args.work_dir = os.path.join(scratch, "runs"), os.path.join(scratch, "work")
        args.quality_p, args.quality_steps, args.quality_batch, args.grid = 2, 2, 4, "1e-3,2e-3"
        args.grid_seeds, args.test_seeds, args.ablation_seeds, args.max_extend = 1, 2, 1, 0
        args.val_per_task, args.test_per_task, args.ablation_span, args.exploration_dir = 2, 2, 0, scratch
        args.ablations = args.ablations if args.ablations != "all" else "router=static,selection=random,k=8, r=4"
    bench, min_d_out = build_bench(args)
    clock = Clock(None if args.quality_minutes is None else 60 * args.quality_minutes)
    grid = sorted(float(v) for v in args.grid.split(","))
    factor = grid[1] / grid[0] if len(grid) > 1 else 2.0
    data = dict(setup=bench.setup, grid=grid, exploration=_exploration(args.exploration_dir),
                grid_seeds=args.grid_seeds, test_seeds=args.test_seeds, main={},
                ablations={}, ablation_seeds=args.ablation_seeds, ablation_grid_seeds=args.ablation_grid_seeds)
    named = named_methods(args.quality_p)
    for name in _rejoin([m.strip() for m in args.methods.split(",") if m.strip()], named):
        kind, settings = named[name]
        chosen, curve = grid_search(bench, kind, settings, grid, args.grid_seeds, factor, args.max_extend, clock,
                                    score_test=args.score_grid_tests)
        data["main"][name] = dict(kind=kind, settings=dict(settings), lr=chosen,
                                  curve={str(lr): [nll(r, "validation") for r in rs] for lr, rs in curve.items()},
                                  trainable=next(iter(curve.values()))[0]["trainable"] if curve else None)
        if chosen is not None:
            data["main"][name]["runs"] = run_test_seeds(bench, kind, settings, chosen, args.test_seeds, clock)
        if partial:
            partial(data)
    default = data["main"].get("ID-LoRA", data["main"].get("ID-LoRA (paper)", {})).get("lr")
    wanted = ablations(args.quality_p, min_d_out)
    names = [] if args.ablations == "none" else list(wanted) if args.ablations == "all" else [
        n.strip() for n in args.ablations.split(",") if n.strip()]
    names = _rejoin(names, wanted)
    for name in names if default is not None else []:
        settings = tuple(sorted(wanted[name].items()))
        near = [lr for lr in grid + [default]
                if abs(math.log(lr / default) / math.log(factor)) <= args.ablation_span + 1e-9]
        chosen, curve = grid_search(bench, "ID-LoRA", settings, sorted(set(near)), args.ablation_grid_seeds, factor,
                                     args.max_extend, clock, score_test=args.score_grid_tests)
        entry = dict(settings=wanted[name], lr=chosen, curve={str(lr): [nll(r, "validation") for r in rs]
                                                              for lr, rs in curve.items()})
        if chosen is not None:
            entry["runs"] = run_test_seeds(bench, "ID-LoRA", settings, chosen, args.ablation_seeds, clock)
            entry["trainable"] = entry["runs"][0]["trainable"] if entry["runs"] else None
        data["ablations"][name] = entry
        if partial:
            partial(data)
    if not args.no_diagnosis:  # minutes, whatever the clock says: it explains the runs that exist
        adapters = {}
        candidates = [(name, entry["kind"], entry) for name, entry in data["main"].items()] + [
            (name, "ID-LoRA", entry) for name, entry in data["ablations"].items()
            if {"router", "router_norm"} & set(entry["settings"])]  # the router sets the update's size
        for label, method, entry in candidates:
            settings = tuple(sorted(entry.get("settings", {}).items()))
            key = Spec(method, entry["lr"], 0, settings).key(bench.setup) if entry["lr"] else None
            folder = os.path.join(args.work_dir, key) if key else None
            if folder and os.path.isfile(os.path.join(folder, "adapter_config.json")):
                adapters[f"{label} (lr {entry['lr']:g})"] = folder
            else:
                log(f"quality: diagnosis: no saved adapter of {label} at its chosen rate on this machine; "
                    "its end-of-training update size is left out")
        data["diagnosis"] = diagnose.run(bench.base, bench.tokenizer, tasks.rows("train")[:16], bench.setup["targets"],
                                         args.quality_p, default or grid[len(grid) // 2], adapters=adapters)
    data["complete"] = not clock.skipped  # --quality-minutes 0 over stored runs only: complete if none is missing
    return data


def _exploration(folder: str) -> list[dict]:
    import glob

    return [read_json(path) for path in sorted(glob.glob(os.path.join(folder, "*-lr*-s*.json")))]


def _rejoin(names: list[str], wanted: dict) -> list[str]:
    """Labels that contain commas ("k=8, r=24", "ID-LoRA rms, s=8") come back split by the comma-separated
    option: join them, longest known label first."""
    out, i = [], 0
    while i < len(names):
        joined = [j for j in range(i, len(names)) if ", ".join(names[i:j + 1]) in wanted]
        if not joined:
            raise SystemExit(f"benchmarks: unknown method or ablation {names[i]!r}; choose from {list(wanted)}")
        out.append(", ".join(names[i:joined[-1] + 1]))
        i = joined[-1] + 1
    return out
