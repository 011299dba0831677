"""The benchmark suite's smoke run: `benchmarks/run.py --smoke` runs every section at toy sizes (seconds) and
writes a doc with each section's table, numbers included, plus the raw JSON the doc can be rebuilt from."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
SECTIONS = ("params", "clustering", "training", "quality")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, str(RUN), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


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

    targets = _section(doc, "Targets")
    assert "Clustering speed" in targets and "Training step" in targets and "Table 3" in targets

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
                  "4. Quality on a real model"):
        assert _without_images(_section(again, title)) == _without_images(_section(doc, title)), title


def _without_images(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line for line in text.splitlines() if not line.startswith("![")))
