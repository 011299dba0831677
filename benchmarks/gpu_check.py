"""`python benchmarks/run.py --gpu-check`: what to run when a GPU is lent, in under 8 minutes on one H100/H200.

Four parts, each timed, then one Markdown table (check, value, target, met?) printed and written with a JSON:
1. tests: `pytest -m cuda tests` in a subprocess (the tests marked `cuda`, among them the adapted forward and
   backward under `torch.cuda.set_sync_debug_mode("error")` and an inductor-compiled model); passed / failed /
   skipped counts;
2. clustering: the product's per-module clustering call (a float32 copy of the weight, then the
   `idlora_select_rows` hook, i.e. PMRC's `select_rows`) on random bf16 weights generated on the GPU, k=4,
   r=64 (the paper's 4p at p=16): one matrix of each distinct Llama-3-8B shape, timed, and extrapolated to
   the model's 7 x 32 matrices; then, when the estimate fits the time budget, all 224 matrices timed one by one;
3. training: step time (forward + backward + AdamW), no-grad forward time and `torch.cuda.max_memory_allocated`
   over a step of ID-LoRA (r=4p) against PEFT LoRA and DoRA (r=p), bf16, on a SmolLM2-135M-shaped Llama built
   from its config (random weights: nothing is read from disk), interleaved (`benchmarks/training.py`);
4. decode: tokens/s with the KV cache at batch 1 and 8 and the 4-token forward, ID-LoRA against unmerged LoRA,
   bf16, the same model (`benchmarks/inference.py`).

Exit status: 0 when every CUDA test passed and every part ran (a missed speed target is reported in the table,
not an error); 1 when a CUDA test failed or errored, none ran, or a part crashed. Without CUDA it prints one line
and exits 0: nothing to check. `--device cpu` runs the same code at --smoke sizes on the CPU (what CI runs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import torch

from common import interleaved, log, median, table, timed

SKIP_LINE = "gpu-check: no CUDA device; nothing to check (the CPU-side parts run in the smoke tier)"
BUDGET_S = 480.0          # the issue's limit: 8 minutes on one H100/H200
TESTS_TIMEOUT_S = 240.0   # the pytest subprocess never takes more than this
TRAIN_RESERVE_S = 120.0   # kept for the training part when deciding whether to time all 224 matrices
WHOLE_CAP_S = 150.0       # all 224 matrices are timed only if their estimate is below this
SHAPE_CAP_S = 30.0        # timed runs per shape drop to one above this
K, R, LAYERS = 4, 64, 32  # clusters (paper), ID-LoRA r = 4p at p = 16 (paper), Llama-3-8B's decoder layers
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_arguments(parser) -> None:
    group = parser.add_argument_group("gpu check")
    group.add_argument("--gpu-check", action="store_true",
                       help="the GPU check: CUDA tests, Llama-3-8B clustering, bf16 training ratios; one table")
    group.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                       help="--gpu-check's device; cpu runs it at --smoke sizes (the CI smoke tier)")
    group.add_argument("--gpu-budget", type=float, default=BUDGET_S, help="--gpu-check's time budget, seconds")


def skipped_without_cuda(argv: list[str]) -> bool:
    """For run.py, before it imports the sections (and PEFT): a `--gpu-check` on the CUDA device where torch sees
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


class Clock:
    def __init__(self, budget: float) -> None:
        self.start, self.budget = time.perf_counter(), budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


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
def product_select(weight: torch.Tensor, k: int, r: int, seed: int = 0, name: str = "w") -> torch.Tensor:
    """The product's per-module clustering call, as `idlora_trl.skeleton.decompose_layers` makes it: a float32
    copy of the weight, then the `idlora_select_rows` hook (the built-in PMRC plugin: `select_rows`)."""
    from idlora_trl import IDLoRAConfig
    from idlora_trl.plugins import get_plugin_manager

    config = IDLoRAConfig(r=r, num_clusters=k, seed=seed)
    copy = weight.detach().to(torch.float32, copy=True)
    return get_plugin_manager().hook.idlora_select_rows(weight=copy, module_name=name, config=config)


def llama_shapes(divisor: int = 1) -> list[tuple[str, tuple[int, int], int]]:
    """(modules, (d_out, d_in), matrices per layer) of each distinct Llama-3-8B weight shape, sides / divisor."""
    from clustering import LLAMA3_8B_SHAPES

    return [(label, (d_out // divisor, d_in // divisor), per_layer)
            for label, ((d_out, d_in), per_layer) in LLAMA3_8B_SHAPES.items()]


def _weight(shape, device: str, gen: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(shape, device=device, generator=gen).mul_(0.02).to(dtype)  # a Llama-like init


def time_llama_shapes(device: str, k: int, r: int, seed: int, repeats: int, divisor: int = 1) -> list[dict]:
    """One random matrix of each distinct shape on `device`, clustered by `product_select`: one untimed run,
    then `repeats` timed ones (synchronized; one only if they would take over SHAPE_CAP_S). Rows as the
    clustering section stores them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for label, shape, per_layer in llama_shapes(divisor):
        w = _weight(shape, device, gen)
        first = timed(lambda w=w: product_select(w, k, r, seed))  # one-time set-up included: not in the median
        n = repeats if first * repeats <= SHAPE_CAP_S else 1
        times = interleaved({"ours": lambda w=w: product_select(w, k, r, seed)}, repeats=n)["ours"]
        rows.append({"modules": label, "shape": list(shape), "per_layer": per_layer, "seconds": times})
        log(f"gpu-check: clustering {label} {shape[0]}x{shape[1]}: {median(times):.3f} s")
    return rows


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
        w = _weight(shape, device, gen)
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
    """training.py's interleaved comparison (LoRA, DoRA, ID-LoRA) in bf16 on `device`, both target sets; fewer
    timed rounds when the budget is nearly spent."""
    import training
    from common import tiny_llama

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
    for tname, targets in training.TARGETS.items():
        # The step's cost does not depend on which rows are kept: `sequential` skips clustering (part 2 times it).
        bases = {m: (base, training._config(m, p, targets, "sequential", seed)) for m in training.METHODS}
        res = training._compare(bases, inputs, training._lm_loss, args, device, profile=False)
        res["ratios"] = {other: _ratios(res, other) for other in ("LoRA", "DoRA")}
        results[tname] = res
        log(f"gpu-check: training {tname}: ID-LoRA / LoRA {res['ratios']['LoRA']}")
    return {"model": label, "dtype": "bfloat16", "device": device, "p": p, "batch": batch, "seq": seq,
            "repeats": list(sizes), "selection": "sequential", "models": results}


def decode_part(device: str, smoke: bool, p: int, seed: int) -> dict:
    """inference.py's interleaved decode (KV cache, batch 1 and 8) and 4-token forward, ID-LoRA against unmerged
    LoRA, in bf16 on `device`."""
    import inference
    from common import tiny_llama

    if smoke:
        base, label, prefill, decode, rounds, p = tiny_llama(vocab=128, hidden=64, layers=2), "tiny Llama", 32, 4, 1, 2
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        base, label = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)), "SmolLM2-135M-shaped Llama (random weights)"
        prefill, decode, rounds = 512, 32, 5
    base = base.to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    models = inference._models(base, p, seed, names=("LoRA", "ID-LoRA"))
    times = inference._measure(models, SimpleNamespace(inference_rounds=rounds), base.config.vocab_size, prefill,
                               decode, device)
    return {"model": label, "dtype": "bfloat16", "decode": decode, "rounds": rounds, "times": times}


def _ratios(res: dict, other: str) -> dict:
    """ID-LoRA / `other`: median step and forward times, and memory: the CUDA peak over a step above what was
    allocated before it, or on the CPU the saved activations + training state (training.py's measure)."""
    def mem(m):
        stats = res["memory"][m]
        return stats.get("cuda_peak_bytes", stats["saved_bytes"] + stats["state_bytes"])

    return {"step": median(res["step_s"]["ID-LoRA"]) / median(res["step_s"][other]),
            "forward": median(res["forward_s"]["ID-LoRA"]) / median(res["forward_s"][other]),
            "memory": mem("ID-LoRA") / mem(other)}


# ------------------------------------------------------------------------------------------ the table
def _yes(met) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def build_rows(data: dict) -> list[list[str]]:
    """The table's rows (check, value, target, met?) from the parts' results (a part may be missing or failed)."""
    import training
    from clustering import GPU_TARGET_S

    rows = []
    tests = data.get("tests")
    if tests is not None:
        ok = tests["failed"] == tests["errors"] == tests["skipped"] == 0 and tests["passed"] > 0
        late = " (timed out)" if tests.get("returncode", 0) is None else ""
        rows.append(["`pytest -m cuda`", f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
                     f"errors, {tests['skipped']} skipped{late}", "all pass, none skipped", _yes(ok)])
    cl = data.get("clustering")
    if cl is not None:
        per = "; ".join(f"{row['modules']} {'x'.join(map(str, row['shape']))}: {median(row['seconds']):.3f} s"
                        for row in cl["rows"])
        n = cl["layers"] * sum(row["per_layer"] for row in cl["rows"])
        rows.append([f"clustering, one matrix per Llama-3-8B shape (k={cl['k']}, r={cl['r']}; median)", per, "-",
                     "-"])
        whole, goal = cl["whole"], f"< {GPU_TARGET_S:.0f} s"
        rows.append([f"clustering, all {n} matrices, extrapolated ({cl['layers']} layers x per-layer sum)",
                     f"{cl['estimated_total_s']:.1f} s", goal,
                     _yes(cl["estimated_total_s"] < GPU_TARGET_S) if "seconds" not in whole else "-"])
        if "seconds" in whole and whole["matrices"] == whole["of"]:
            value, met = f"{whole['seconds']:.1f} s", whole["seconds"] < GPU_TARGET_S
        elif "seconds" in whole:
            value, met = f"partial: {whole['matrices']} of {whole['of']} in {whole['seconds']:.1f} s (budget)", None
        else:
            value, met = f"not run: {whole['skipped']}", None
        rows.append([f"clustering, all {n} matrices, timed one by one", value, goal, _yes(met)])
    tr = data.get("training")
    for tname, res in (tr or {}).get("models", {}).items():
        memory = "CUDA peak over a step" if tr["device"] == "cuda" else "saved activations + state"
        for key, goal, what in (("step", training.STEP_TARGET, "step"), ("forward", training.FORWARD_TARGET,
                                "no-grad forward"), ("memory", training.MEMORY_TARGET, memory)):
            lora, dora = res["ratios"]["LoRA"][key], res["ratios"]["DoRA"][key]
            rows.append([f"ID-LoRA / LoRA, {what}, {tname}, bf16", f"{lora:.3f}x (ID-LoRA / DoRA {dora:.3f}x)",
                         f"<= {goal:.2f}x", _yes(lora <= goal)])
    dec = data.get("decode")
    if dec is not None:
        import inference

        times = dec["times"]
        for key, what in (("decode1_s", "batch 1"), ("decode8_s", "batch 8")):
            ratio = 1 / inference._paired(times, key, "ID-LoRA", "LoRA")
            rows.append([f"decode tokens/s, ID-LoRA / unmerged LoRA, {what}, KV cache, bf16", f"{ratio:.3f}x",
                         f">= {inference.DECODE_TARGET:.2f}x", _yes(ratio >= inference.DECODE_TARGET)])
        ratio = inference._paired(times, "small_s", "ID-LoRA", "LoRA")
        rows.append(["forward at 4 tokens, ID-LoRA / LoRA, bf16", f"{ratio:.3f}x",
                     f"<= {inference.SMALL_TARGET:.2f}x", _yes(ratio <= inference.SMALL_TARGET)])
    for part, error in data.get("errors", {}).items():
        rows.append([f"part {part}", f"crashed: `{error}`", "runs", _yes(False)])
    times = ", ".join(f"{part} {s:.0f} s" for part, s in data.get("part_s", {}).items())
    total = data.get("total_s", 0.0)
    rows.append(["total time", f"{total:.0f} s ({times})", f"< {BUDGET_S:.0f} s", _yes(total < BUDGET_S)])
    return rows


def exit_status(data: dict, smoke: bool) -> int:
    """1 when a CUDA test failed or errored, none passed (outside a smoke run), or a part crashed; else 0."""
    tests = data.get("tests") or {"failed": 0, "errors": 0, "passed": 0}
    bad_tests = tests["failed"] or tests["errors"] or (not smoke and tests["passed"] == 0)
    return 1 if bad_tests or data.get("errors") else 0


def main(args, common) -> int:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print(SKIP_LINE, flush=True)
        return 0
    smoke = args.smoke or device == "cpu"
    out = args.out or os.path.join(tempfile.gettempdir(), "idlora-gpu-check", "gpu_check.md")
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    clock = Clock(args.gpu_budget)
    data = {"machine": common.machine_info(), "device": device, "smoke": smoke, "budget_s": args.gpu_budget,
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
    where = f"{data['machine']['cuda'] or 'CPU'}" + (" (smoke sizes: the numbers mean nothing)" if smoke else "")
    text = f"**GPU check** on {where}, {data['machine']['date']}\n\n" + \
        table(["check", "value", "target", "met?"], data["rows"], "llll") + "\n"
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, default=str)
    print(text, flush=True)
    log(f"gpu-check: wrote {out} and its .json; exit status {data['exit_status']}")
    return data["exit_status"]
