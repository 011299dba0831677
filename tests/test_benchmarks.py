"""The benchmark suite's smoke run: `python -m benchmarks --smoke` runs every section at toy sizes (seconds) and
writes a doc with each section's table, numbers included, plus the raw JSON the doc can be rebuilt from."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # where `python -m benchmarks` finds the package
SECTIONS = ("params", "clustering", "training", "quality", "overhead", "inference", "qlora")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _section(doc: str, title: str) -> str:
    start = doc.index(f"## {title}")
    end = doc.find("\n## ", start + 1)
    return doc[start:end if end != -1 else len(doc)]


def _numeric_rows(text: str) -> list[str]:
    """Table rows (not the separator) that hold at least one number."""
    return [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("|---") and re.search(r"\d", line)]


def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "B.md"
    # one thread: the smoke run must stay fast on a CI machine shared with other jobs
    result = _run("--smoke", "--threads", "1", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = out.read_text()
    assert doc in result.stdout  # the tables are printed too
    assert "not run" not in doc.replace("Reference not run", "")

    params = _section(doc, "1. Trainable parameters")
    assert re.search(r"\| LoRA r=32 \| 48,627,712 \| 1\.49% \| 1\.49% \| yes \|", params), params
    assert re.search(r"\| ID-LoRA r=128 \| 24,797,696 \| 0\.77% \| 0\.77% \| yes \|", params), params
    assert "agrees with PEFT on every row" in params

    clustering = _section(doc, "2. Clustering cost")
    assert re.search(r"\| gaussian \d+x\d+ \| \d+x\d+ \| [\d.]+ (ms )?\(x\d\) \| [\d.]+ (ms )?\(x\d\) \| [\d.]+x \| "
                     r"[\d.]+ \|", clustering), clustering
    assert "Whole-model decomposition" in clustering and "Where our clustering time goes" in clustering
    assert len(_numeric_rows(clustering)) >= 6

    training = _section(doc, "3. Training cost")
    for method in ("LoRA", "DoRA", "ID-LoRA"):
        rows = [r for r in _numeric_rows(training) if r.startswith(f"| {method} |")]
        assert len(rows) == 3, training  # two target sets and the single layer
        assert all(re.search(r"\| [\d.]+x \|", r) for r in rows)
    assert "Operator profile" in training

    quality = _section(doc, "4. Quality on a real model")
    for method in ("LoRA", "DoRA", "VeRA", "ID-LoRA"):  # chosen rate, trainable count, accuracy ± CI, NLL
        row = rf"\| {method} \| [\d.e-]+ \| [\d,]+.*\| \d\.\d{{3}} ± \d\.\d{{3}} \| \d"
        assert re.search(row, quality), (method, quality)
    for label in ("router=static", "selection=random", "k=8, r=4"):
        assert re.search(rf"\| {re.escape(label)} \| [\d.e-]+ \|.*\d\.\d{{3}}", quality), (label, quality)
    assert "The learning-rate grid" in quality and "ID-LoRA against LoRA" in quality
    assert "Skeleton conditioning" in quality and "pmrc + pivoted QR" in quality and "Update size" in quality
    assert "Update size at the end of training" in quality and "| ID-LoRA (lr " in quality
    assert "| router=static (lr " in quality  # ablations that change the router are diagnosed too

    overhead = _section(doc, "5. CPU overhead of the command")  # the command twice under /usr/bin/time -v
    rows = _numeric_rows(overhead)
    assert len(rows) == 2 and "THP_MEM_ALLOC_ENABLE=0 (before)" in rows[0] and "as shipped" in rows[1], overhead

    inference = _section(doc, "6. Inference speed")  # 5 eager models, 3 compiled; no graph break of ours
    rows = _numeric_rows(inference)
    assert sum("| eager |" in r for r in rows) == 5 and sum("| compiled |" in r for r in rows) == 3, inference
    assert "Graph breaks" in inference and "ID-LoRA 0." in inference

    qlora = _section(doc, "7. QLoRA-style training cost (4-bit base)")  # bitsandbytes: the Axolotl tier's venv
    if importlib.util.find_spec("bitsandbytes") is None:  # measured in tests/test_quantized.py there
        assert "Not measured: bitsandbytes is not installed (pip install --no-deps bitsandbytes)." in qlora, qlora
    else:
        assert [r.split(" |")[0] for r in _numeric_rows(qlora)] == ["| QLoRA", "| ID-LoRA"], qlora

    targets = _section(doc, "Targets")
    assert "Decode tokens/s of ID-LoRA / unmerged LoRA, batch 1, eager" in targets
    assert "Clustering speed" in targets and "Training step" in targets and "Table 3" in targets
    assert "Kernel time of" in targets and "Training forward of ID-LoRA / LoRA, one layer" in targets

    bench_dir = tmp_path / "benchmarks"
    for name in SECTIONS:
        data = json.loads((bench_dir / f"{name}.json").read_text())
        assert data["smoke"] is True and data["machine"]["threads"] == 1

    # the doc is rebuilt from the JSON alone, without measuring anything (no plots: compare the text)
    (tmp_path / "r").mkdir()
    bench_dir.rename(tmp_path / "r" / "benchmarks")
    rebuilt = tmp_path / "r" / "R.md"
    result = _run("--from-json", "--no-plots", "--out", str(rebuilt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    again = rebuilt.read_text()
    for title in ("Targets", "1. Trainable parameters", "2. Clustering cost", "3. Training cost",
                  "4. Quality on a real model", "5. CPU overhead of the command", "6. Inference speed",
                  "7. QLoRA-style training cost (4-bit base)"):
        assert _without_images(_section(again, title)) == _without_images(_section(doc, title)), title


def _without_images(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line for line in text.splitlines() if not line.startswith("![")))


# ------------------------------------------------------------------------------------------- --gpu-check
def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run (see the --device cpu test)")
    result = _run("--gpu-check", "--threads", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ("gpu-check: no CUDA device; nothing to check (the CPU-side parts run in the "
                                     "smoke tier)")


def test_gpu_check_runs_its_cpu_side_at_smoke_sizes(tmp_path):
    """`--gpu-check --device cpu`: every part of the GPU check (the `cuda` tests, skipping here; Llama-3-8B shapes
    / 64 with the whole-model count; the bf16 ratios on a tiny Llama) and its one table, exit 0."""
    out = tmp_path / "check.md"
    result = _run("--gpu-check", "--device", "cpu", "--threads", "1", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert text in result.stdout and "| check | value | target | met? |" in text
    data = json.loads((tmp_path / "check.json").read_text())
    assert data["smoke"] is True and data["errors"] == {} and data["exit_status"] == 0
    tests = data["tests"]
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 6, tests
    assert re.search(r"\| `pytest -m cuda` \| 0 passed, 0 failed, 0 errors, \d+ skipped \|", text)
    clustering = data["clustering"]
    assert [row["shape"] for row in clustering["rows"]] == [[64, 64], [16, 64], [224, 64], [64, 224]]
    assert clustering["whole"]["matrices"] == clustering["whole"]["of"] == 14  # 7 matrices x 2 layers
    assert re.search(r"\| clustering, all 14 matrices, timed one by one \| [\d.]+ s \| < 60 s \| (yes|\*\*no\*\*) \|",
                     text), text
    for tname in ("q,k,v,gate,up", "all-linear"):
        for what in ("step", "no-grad forward", "saved activations \\+ state"):
            assert re.search(rf"\| ID-LoRA / LoRA, {what}, {re.escape(tname)}, bf16 \| [\d.]+x \(ID-LoRA / DoRA "
                             r"[\d.]+x\) \| <= 1\.\d\dx \|", text), (what, tname, text)
    for what in ("batch 1", "batch 8"):  # the decode part: ID-LoRA against unmerged LoRA
        assert re.search(rf"\| decode tokens/s, ID-LoRA / unmerged LoRA, {what}, KV cache, bf16 \| [\d.]+x \|", text)
    assert re.search(r"\| forward at 4 tokens, ID-LoRA / LoRA, bf16 \| [\d.]+x \|", text)
    assert re.search(r"\| total time \| \d+ s \(tests \d+ s, clustering \d+ s, training \d+ s, decode \d+ s\) \| "
                     r"< 480 s \|", text)


def test_gpu_check_table_and_exit_status():
    """Rows for what a GPU run can meet: failed tests, a whole-model count cut by the budget or not run, a crashed
    part. Exit status 1 for failed tests or a crash; 0 with every test passed, whatever the targets."""
    from benchmarks import gpu_check

    shapes = [{"modules": "q", "shape": [8, 8], "per_layer": 2, "seconds": [0.5, 0.4]}]
    clustering = {"k": 4, "r": 64, "layers": 32, "rows": shapes, "estimated_total_s": 28.8,
                  "whole": {"matrices": 10, "of": 64, "seconds": 5.0}}
    data = {"tests": {"passed": 7, "failed": 1, "errors": 0, "skipped": 0}, "clustering": clustering,
            "errors": {"training": "RuntimeError: CUDA out of memory"}, "part_s": {"tests": 20.0}, "total_s": 500.0}
    rows = {row[0]: row[1:] for row in gpu_check.build_rows(data)}
    assert rows["`pytest -m cuda`"] == ["7 passed, 1 failed, 0 errors, 0 skipped", "all pass, none skipped", "**no**"]
    assert rows["clustering, all 64 matrices, extrapolated (32 layers x per-layer sum)"] == ["28.8 s", "< 60 s", "-"]
    assert rows["clustering, all 64 matrices, timed one by one"][0] == "partial: 10 of 64 in 5.0 s (budget)"
    assert rows["part training"] == ["crashed: `RuntimeError: CUDA out of memory`", "runs", "**no**"]
    assert rows["total time"] == ["500 s (tests 20 s)", "< 480 s", "**no**"]
    assert gpu_check.exit_status(data, smoke=False) == 1
    clustering["whole"] = {"skipped": "estimated 90 s, over what the budget leaves"}
    data.update(tests={"passed": 7, "failed": 0, "errors": 0, "skipped": 0}, errors={})
    rows = {row[0]: row[1:] for row in gpu_check.build_rows(data)}
    assert rows["clustering, all 64 matrices, extrapolated (32 layers x per-layer sum)"][2] == "yes"
    assert rows["clustering, all 64 matrices, timed one by one"][0].startswith("not run: estimated 90 s")
    assert gpu_check.exit_status(data, smoke=False) == 0
    data["tests"]["passed"] = 0  # nothing ran on a GPU: an error, but not in a smoke run (they skip on the CPU)
    assert gpu_check.exit_status(data, smoke=False) == 1 and gpu_check.exit_status(data, smoke=True) == 0


def test_quality_report_is_partial_only_when_a_needed_run_was_left_out():
    """`--quality-minutes 0` over stored runs (the doc's final render) is complete; a run left out at the deadline
    makes the report say "partial"."""
    from benchmarks.common import Clock

    clock = Clock(0)  # the deadline is now: nothing new may start
    assert not clock.skipped  # rendering stored runs asks nothing of the clock
    assert clock.skip() and clock.skipped
    unlimited = Clock(None)
    assert not unlimited.skip() and not unlimited.skipped and unlimited.left() == float("inf")


def test_overhead_parses_time_v():
    from benchmarks.overhead import measure as overhead

    text = ("\tUser time (seconds): 208.14\n\tSystem time (seconds): 21.03\n"
            "\tMaximum resident set size (kbytes): 2863412\n\tMinor (reclaiming a frame) page faults: 702760\n")
    assert overhead.parse_time_v(text) == {"minor_faults": 702760.0, "system_s": 21.03, "user_s": 208.14,
                                           "max_rss_kb": 2863412.0}
    with pytest.raises(ValueError, match="Minor"):
        overhead.parse_time_v(text.replace("Minor", "Major"))


def test_paired_interval_of_the_training_ratios():
    """The per-round ratio's median and its distribution-free 95% interval (binomial order statistics)."""
    from benchmarks.training.report import paired_interval

    lora = [1.0] * 16
    res = {"step_s": {"LoRA": lora, "ID-LoRA": [1.0 + i / 100 for i in range(16)]}}  # ratios 1.00 .. 1.15
    mid, low, high = paired_interval(res, "step_s")
    # n = 16: P(Binomial(16, 1/2) <= 3) = 0.0106 <= 0.025 < P(<= 4) = 0.0384, so the 4th and 13th ratios
    assert (round(mid, 3), round(low, 2), round(high, 2)) == (1.075, 1.03, 1.12)
    res["step_s"]["ID-LoRA"] = [1.0, 1.1]  # too few rounds for a 95% interval: the whole range
    assert paired_interval(res, "step_s")[1:] == (1.0, 1.1)


def test_mean_pm_cells():
    """Every report's "mean ± 95% half-width" cell: the t-interval by hand, one value alone, none a dash."""
    from benchmarks.stats import mean_pm

    assert mean_pm([1.0, 2.0, 3.0]) == "2.000 ± 2.484"  # sd 1, n 3: 4.303 / sqrt(3) = 2.4843
    assert mean_pm([0.25, 0.75], digits=2) == "0.50 ± 3.18"  # sd 0.3536, n 2: 12.706 * 0.3536 / sqrt(2) = 3.1765
    assert mean_pm([0.5]) == "0.500" and mean_pm([]) == "—"
