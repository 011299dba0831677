"""The benchmark suite of idlora-trl: writes docs/BENCHMARKS.md (tables, PNG plots) and prints the tables.

Run by hand from the repository root (the full suite takes about an hour on 2 cores; see docs/BENCHMARKS.md for
each section's time):

    python -m benchmarks                                   # everything, writes docs/BENCHMARKS.md
    python -m benchmarks --only params,clustering          # some sections; the others are "not run"...
    python -m benchmarks --only training --from-json       # ...or taken from their earlier JSON
    python -m benchmarks --from-json                       # rebuild the doc from docs/benchmarks/*.json
    python -m benchmarks --smoke --out /tmp/bench/B.md     # every section at toy sizes, seconds (CI)
    python -m benchmarks --gpu-check --out D/gpu_check.md  # GPU: CUDA tests, clustering, bf16 ratios (<8 min)

Sections: params (trainable parameters, meta device), clustering (ours against k-means-constrained), training
(step/forward time and memory against PEFT LoRA and DoRA), quality (held-out accuracy, seeds, ablations),
overhead (page faults and kernel time of the `idlora-trl` command, under `/usr/bin/time -v`), inference (prefill,
decoding with the KV cache and small forwards against LoRA, eager and compiled), qlora (step time and memory
against QLoRA on one bitsandbytes 4-bit base; needs bitsandbytes).
Every comparison runs side by side in this one process, interleaved (A, B, C, A, B, C, ...), quoted as medians
and ratios. Raw results go to <doc dir>/benchmarks/<section>.json next to the doc, plots to the same folder;
the doc's numbers come only from those measurements. Torch and BLAS threads are pinned (--threads, default 2).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

COMMAND = "python -m benchmarks"


def _early_threads(argv: list[str]) -> str:
    """--threads, read before numpy and torch are imported, so that BLAS/OpenMP pools get the same count."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "2"


def section_modules() -> dict:
    """Section name -> its package (`add_arguments` and `run` from its measure.py, `render` from its report.py);
    imported only once the thread variables are set."""
    from benchmarks import common

    return {name: importlib.import_module(f"benchmarks.{name}") for name in common.SECTIONS}


def parser() -> argparse.ArgumentParser:
    from benchmarks import gpu_check

    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--smoke", action="store_true", help="every section at toy sizes, in seconds (what CI runs)")
    ap.add_argument("--only", default=None, help="comma-separated sections: params,clustering,training,quality")
    ap.add_argument("--out", default=None,
                    help="the Markdown file to write (default docs/BENCHMARKS.md; with --smoke, a temp dir)")
    ap.add_argument("--from-json", action="store_true",
                    help="sections not measured in this run are read from <doc dir>/benchmarks/<section>.json")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (and OMP/BLAS threads)")
    ap.add_argument("--seed", type=int, default=0, help="clustering seed")
    ap.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    for module in (*section_modules().values(), gpu_check):
        module.add_arguments(ap)
    return ap


class Context:
    """What the sections' renderers may read: where plots go, and the other sections' data."""

    def __init__(self, plot_dir, plot_rel: str, data: dict) -> None:
        self.plot_dir, self.plot_rel, self.data = plot_dir, plot_rel, data

    @staticmethod
    def threads_of(section: dict) -> int:
        return section.get("machine", {}).get("threads", "?")

    def clustering_summary(self) -> str:
        data = self.data.get("clustering")
        whole = (data or {}).get("whole")
        if not whole:
            return ""
        parts = [f"{w['targets']}: {w['modules']} modules in {w['pmrc_s'] - w['sequential_s']:.1f} s of clustering"
                 for w in whole["rows"]]
        return (f"The clustering section times the whole {whole['model']} decomposition (r={whole['r']}, "
                f"k={whole['k']}): " + "; ".join(parts) + ".")


def _json_path(json_dir: str, name: str) -> str:
    return os.path.join(json_dir, f"{name}.json")


GPU_CHECK_NOTE = (
    f"**GPU check.** When a GPU is lent, `{COMMAND} --gpu-check --out DIR/gpu_check.md` runs, in "
    "under 8 minutes on one H100/H200: the tests marked `cuda` (`pytest -m cuda`); the clustering of "
    "Llama-3-8B-shaped matrices (k=4, r=64, random bf16 weights made on the GPU: one matrix of each distinct shape "
    "timed and extrapolated to the model's 224, then all 224 timed one by one when the estimate fits the time "
    "budget; target < 60 s); and the step, forward and peak-memory ratios of ID-LoRA against LoRA and DoRA in bf16 "
    "on a SmolLM2-135M-shaped model, and its decode tokens/s with the KV cache at batch 1 and 8 against unmerged "
    "LoRA. The CUDA tests include the adapted forward and backward under `torch.cuda.set_sync_debug_mode(\"error\")` "
    "and an inductor-compiled model. It prints one table (check, value, target, met?) and writes it with a JSON "
    "next to `--out` (default: a temp folder), not into this doc. Exit status 1 when a CUDA test fails or a part "
    "crashes, else 0 (missed targets are in the table); without CUDA it prints one line and exits 0. Its CPU-side "
    "parts run at toy sizes (`--gpu-check --device cpu`) in the smoke tests, `tests/test_benchmarks.py`.")
TITLES = {"params": "1. Trainable parameters", "clustering": "2. Clustering cost",
          "training": "3. Training cost", "quality": "4. Quality on a real model",
          "overhead": "5. CPU overhead of the command", "inference": "6. Inference speed",
          "qlora": "7. QLoRA-style training cost (4-bit base)"}


def render_doc(data: dict, errors: dict, command: str, ctx: Context) -> str:
    from benchmarks import common

    modules = section_modules()
    sections, targets = [], []
    for name in common.SECTIONS:
        sections += [f"## {TITLES[name]}", ""]
        section = data.get(name)
        if name in errors:
            sections += [f"**failed** in this run: `{errors[name]}`", ""]
        if section is None:
            sections += ["not run", ""]
            continue
        meta = section.get("machine", {})
        smoke = " **Smoke run: toy sizes, the numbers mean nothing.**" if section.get("smoke") else ""
        took = f"; the section took {section['wall_s']:.0f} s" if "wall_s" in section else ""
        sections += [f"*Measured {common.machine_line(meta)}{took}.*{smoke}", ""]
        markdown, section_targets = modules[name].render(section, ctx)
        sections += [markdown, ""]
        targets += section_targets
    head = ["# Benchmarks", "",
            f"Generated by `{command}`. Every number comes from the measurements stored in "
            f"`{ctx.plot_rel}/*.json` next to this file (`{COMMAND} --from-json` rebuilds the doc "
            "without measuring); do not edit by hand. Comparisons run side by side in one process, interleaved, "
            "and are quoted as medians and ratios.", "", GPU_CHECK_NOTE, ""]
    smoke = [name for name in common.SECTIONS if (data.get(name) or {}).get("smoke")]
    if smoke:
        head += [f"**Smoke run ({', '.join(smoke)}): toy sizes, the numbers below mean nothing.**", ""]
    now = common.machine_info()
    head += ["**Machine of this run** (each section below says when and where it was measured)", "",
             common.table(["", ""], [
        ["CPU", now["cpu"]], ["cores (usable)", f"{now['cores']} ({now['usable_cores']})"],
        ["torch threads", now["threads"]], ["GPU", now["cuda"] or "none"],
        ["versions", f"python {now['python']}, torch {now['torch']}, peft {now['peft']}, trl {now['trl']}, "
                     f"transformers {now['transformers']}, k-means-constrained {now['k-means-constrained']}"],
        ["date", now["date"]]], "ll"), ""]
    rows = [[t["target"], t["goal"], t["measured"], common.status(t["met"]), t["note"]] for t in targets]
    head += ["## Targets", "", common.table(["target", "goal", "measured", "status", "why / by how much"], rows,
                                            "lllll") if targets else "No section with targets was run.", ""]
    return "\n".join(head + sections).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    threads = _early_threads(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = threads
    from benchmarks import common, gpu_check

    if gpu_check.skipped_without_cuda(argv):
        return 0
    common.quiet()
    args = parser().parse_args(argv)
    common.set_threads(args.threads)
    if args.gpu_check:  # its own run and output (benchmarks/gpu_check/): the doc is left alone
        return gpu_check.main(args)
    if args.out is None:
        args.out = (os.path.join(os.environ.get("TMPDIR", "/tmp"), "idlora-bench-smoke", "BENCHMARKS.md")
                    if args.smoke else os.path.join(common.ROOT, "docs", "BENCHMARKS.md"))
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = [s for s in only or [] if s not in common.SECTIONS]
    if unknown:
        print(f"benchmarks: unknown section(s) {unknown}; choose from {', '.join(common.SECTIONS)}", file=sys.stderr)
        return 2
    measure = only if only is not None else ([] if args.from_json else list(common.SECTIONS))
    doc_dir = os.path.dirname(os.path.abspath(args.out))
    json_dir = os.path.join(doc_dir, "benchmarks")
    modules = section_modules()
    data, errors = {}, {}
    for name in common.SECTIONS:
        path = _json_path(json_dir, name)
        if name in measure:
            common.log(f"section {name}: measuring")
            info = common.machine_info()
            start = time.perf_counter()
            try:
                kwargs = {"partial": lambda d, p=path, i=info: common.write_json(p, dict(d, machine=i, partial=True,
                                                                                         smoke=args.smoke))} \
                    if name == "quality" else {}
                section = modules[name].run(args, **kwargs)
            except Exception as error:  # report it, keep the other sections
                traceback.print_exc()
                errors[name] = f"{type(error).__name__}: {error}".splitlines()[0]
                if args.from_json and os.path.isfile(path):
                    data[name] = common.read_json(path)
                continue
            section.update(machine=info, smoke=args.smoke, wall_s=time.perf_counter() - start)
            common.write_json(path, section)
            data[name] = section
        elif args.from_json and os.path.isfile(path):
            data[name] = common.read_json(path)
    ctx = Context(None if args.no_plots else json_dir, "benchmarks", data)
    command = f"{COMMAND} " + " ".join(argv) if argv else COMMAND
    doc = render_doc(data, errors, command, ctx)
    os.makedirs(doc_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(doc)
    print(doc)
    common.log(f"wrote {args.out} (raw results and plots in {json_dir})")
    return 1 if errors else 0

