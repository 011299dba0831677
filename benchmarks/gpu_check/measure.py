"""The GPU check's parts: the CUDA tests, the clustering of Llama-3-8B shapes, the bf16 training ratios and decode
(the package's docstring says what each does); `main` runs them in its time budget and writes the table."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import torch

from benchmarks.clustering.gpu import llama_shapes, product_select, random_weight, time_llama_shapes
from benchmarks.common import ROOT, Clock, log, machine_info, timed, tiny_llama, write_json
from benchmarks.gpu_check.report import BUDGET_S, build_rows, exit_status, render
from benchmarks.inference.measure import build_models, time_models
from benchmarks.stats import median
from benchmarks.training.measure import METHODS, TARGETS, compare, lm_loss, peft_config

SKIP_LINE = "gpu-check: no CUDA device; nothing to check (the CPU-side parts run in the smoke tier)"
TESTS_TIMEOUT_S = 240.0   # the pytest subprocess never takes more than this
TRAIN_RESERVE_S = 120.0   # kept for the training part when deciding whether to time all 224 matrices
WHOLE_CAP_S = 150.0       # all 224 matrices are timed only if their estimate is below this
K, R, LAYERS = 4, 64, 32  # clusters (paper), ID-LoRA r = 4p at p = 16 (paper), Llama-3-8B's decoder layers
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)


def add_arguments(parser) -> None:
    group = parser.add_argument_group("gpu check")
    group.add_argument("--gpu-check", action="store_true",
                       help="the GPU check: CUDA tests, Llama-3-8B clustering, bf16 training ratios; one table")
    group.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                       help="--gpu-check's device; cpu runs it at --smoke sizes (the CI smoke tier)")
    group.add_argument("--gpu-budget", type=float, default=BUDGET_S, help="--gpu-check's time budget, seconds")


def skipped_without_cuda(argv: list[str]) -> bool:
    """For the CLI, before it imports the sections (and PEFT): a `--gpu-check` on the CUDA device where torch sees
    none prints the skip line and returns True, in a second or two."""
    import argparse

    if "-h" in argv or "--help" in argv:
        return False
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--gpu-check", action="store_true")
    early.add_argument("--device", default="cuda")
    known = early.parse_known_args(argv)[0]
    if not known.gpu_check or known.device != "cuda" or torch.cuda.is_available():
        return False
    print(SKIP_LINE, flush=True)
    return True


# ------------------------------------------------------------------------------------------- 1. tests
def junit_counts(path: str) -> dict:
    """passed / failed / errors / skipped of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "errors": n["errors"], "skipped": n["skipped"]}


def run_cuda_tests(paths: list[str], out_dir: str, timeout: float) -> dict:
    """`pytest -m cuda PATHS` in a subprocess from the repository root; its log goes to out_dir."""
    junit, logfile = os.path.join(out_dir, "gpu_check_junit.xml"), os.path.join(out_dir, "gpu_check_pytest.log")
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *paths]
    if os.path.exists(junit):
        os.remove(junit)
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as error:  # its captured output comes back as bytes
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                         for part in (error.stdout, error.stderr))
        output, rc = output + f"\ntimed out after {timeout:.0f} s", None
    with open(logfile, "w", encoding="utf-8") as handle:
        handle.write(" ".join(command) + "\n" + output)
    counts = junit_counts(junit) if rc is not None and os.path.exists(junit) else \
        {"passed": 0, "failed": 0, "errors": 1, "skipped": 0}
    if counts["failed"] or counts["errors"]:
        print(output[-4000:], file=sys.stderr, flush=True)
    return {"command": " ".join(command[1:]), "returncode": rc, "log": logfile, **counts}


# -------------------------------------------------------------------------------------- 2. clustering
def time_whole_model(device: str, k: int, r: int, seed: int, layers: int, divisor: int, clock: Clock,
                     reserve: float) -> dict:
    """Every matrix of the model clustered one after the other, each on a fresh random weight (generated
    untimed); stops early when less than `reserve` seconds of the budget are left."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    plan = [(label, shape) for _ in range(layers) for label, shape, per_layer in llama_shapes(divisor)
            for _ in range(per_layer)]
    seconds, done = 0.0, 0
    for label, shape in plan:
        if clock.left() < reserve:
            break
        w = random_weight(shape, device, gen)
        seconds += timed(lambda w=w, label=label: product_select(w, k, r, seed, name=label))
        done += 1
    return {"matrices": done, "of": len(plan), "seconds": seconds}


def clustering_part(device: str, smoke: bool, seed: int, clock: Clock) -> dict:
    divisor, r, layers, repeats = (64, 4, 2, 1) if smoke else (1, R, LAYERS, 3)
    rows = time_llama_shapes(device, K, r, seed, repeats, divisor)
    estimate = layers * sum(row["per_layer"] * median(row["seconds"]) for row in rows)
    out = {"k": K, "r": r, "layers": layers, "divisor": divisor, "rows": rows, "estimated_total_s": estimate}
    if estimate <= min(WHOLE_CAP_S, clock.left() - TRAIN_RESERVE_S):
        out["whole"] = time_whole_model(device, K, r, seed, layers, divisor, clock, TRAIN_RESERVE_S)
    else:
        out["whole"] = {"skipped": f"estimated {estimate:.0f} s, over what the budget leaves"}
    return out


# ---------------------------------------------------------------------------------------- 3. training
def training_part(device: str, smoke: bool, p: int, seed: int, clock: Clock) -> dict:
    """The training section's interleaved comparison (LoRA, DoRA, ID-LoRA) in bf16 on `device`, both target sets; fewer
    timed rounds when the budget is nearly spent."""
    if smoke:
        base, label, (batch, seq), sizes = tiny_llama(vocab=128, hidden=64, layers=2), "tiny Llama", (2, 16), (2, 2, 1)
        p = 2
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        base, label = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)), "SmolLM2-135M-shaped Llama (random weights)"
        (batch, seq), sizes = (8, 512), (20, 40, 3) if clock.left() > TRAIN_RESERVE_S else (5, 10, 1)
    base = base.to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (batch, seq), generator=gen).to(device)}
    args = SimpleNamespace(train_repeats=sizes[0], forward_repeats=sizes[1], train_warmup=sizes[2])
    results = {}
    for tname, targets in TARGETS.items():
        # The step's cost does not depend on which rows are kept: `sequential` skips clustering (part 2 times it).
        bases = {m: (base, peft_config(m, p, targets, "sequential", seed)) for m in METHODS}
        res = compare(bases, inputs, lm_loss, args, device, profile=False)
        res["ratios"] = {other: _ratios(res, other) for other in ("LoRA", "DoRA")}
        results[tname] = res
        log(f"gpu-check: training {tname}: ID-LoRA / LoRA {res['ratios']['LoRA']}")
    return {"model": label, "dtype": "bfloat16", "device": device, "p": p, "batch": batch, "seq": seq,
            "repeats": list(sizes), "selection": "sequential", "models": results}


def decode_part(device: str, smoke: bool, p: int, seed: int) -> dict:
    """The inference section's interleaved decode (KV cache, batch 1 and 8) and 4-token forward, ID-LoRA against
    unmerged LoRA, in bf16 on `device`."""
    if smoke:
        base, label, prefill, decode, rounds, p = tiny_llama(vocab=128, hidden=64, layers=2), "tiny Llama", 32, 4, 1, 2
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        base, label = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)), "SmolLM2-135M-shaped Llama (random weights)"
        prefill, decode, rounds = 512, 32, 5
    base = base.to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    models = build_models(base, p, seed, names=("LoRA", "ID-LoRA"))
    times = time_models(models, SimpleNamespace(inference_rounds=rounds), base.config.vocab_size, prefill,
                               decode, device)
    return {"model": label, "dtype": "bfloat16", "decode": decode, "rounds": rounds, "times": times}


def _ratios(res: dict, other: str) -> dict:
    """ID-LoRA / `other`: median step and forward times, and memory: the CUDA peak over a step above what was
    allocated before it, or on the CPU the saved activations + training state (the training section's measure)."""
    def mem(m):
        stats = res["memory"][m]
        return stats.get("cuda_peak_bytes", stats["saved_bytes"] + stats["state_bytes"])

    return {"step": median(res["step_s"]["ID-LoRA"]) / median(res["step_s"][other]),
            "forward": median(res["forward_s"]["ID-LoRA"]) / median(res["forward_s"][other]),
            "memory": mem("ID-LoRA") / mem(other)}


def main(args) -> int:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print(SKIP_LINE, flush=True)
        return 0
    smoke = args.smoke or device == "cpu"
    out = args.out or os.path.join(tempfile.gettempdir(), "idlora-gpu-check", "gpu_check.md")
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    clock = Clock(args.gpu_budget)
    data = {"machine": machine_info(), "device": device, "smoke": smoke, "budget_s": args.gpu_budget,
            "part_s": {}, "errors": {}}
    paths = ["tests/test_cuda.py"] if smoke else ["tests"]
    parts = {"tests": lambda: run_cuda_tests(paths, out_dir, min(TESTS_TIMEOUT_S, max(clock.left() / 2, 30.0))),
             "clustering": lambda: clustering_part(device, smoke, args.seed, clock),
             "training": lambda: training_part(device, smoke, args.p, args.seed, clock),
             "decode": lambda: decode_part(device, smoke, args.p, args.seed)}
    for name, part in parts.items():
        start = time.perf_counter()
        log(f"gpu-check: part {name} ({clock.left():.0f} s of the budget left)")
        try:
            data[name] = part()
        except Exception as error:  # report it, run the other parts
            traceback.print_exc()
            data["errors"][name] = f"{type(error).__name__}: {error}".splitlines()[0]
        data["part_s"][name] = time.perf_counter() - start
        log(f"gpu-check: part {name} took {data['part_s'][name]:.1f} s")
    data["total_s"] = clock.elapsed()
    data["rows"] = build_rows(data)
    data["exit_status"] = exit_status(data, smoke)
    text = render(data)
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(text)
    write_json(os.path.splitext(out)[0] + ".json", data)
    print(text, flush=True)
    log(f"gpu-check: wrote {out} and its .json; exit status {data['exit_status']}")
    return data["exit_status"]
