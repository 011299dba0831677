"""Shared helpers of the benchmark suite: paths, threads, machine info, interleaved timing and a clock, JSON,
Markdown, plots, tiny models (the statistics are in `benchmarks.stats`).

Every comparison in the suite goes through :func:`interleaved`: the candidates run in turn (A, B, C, A, B, C,
...) in one process, so a change in machine load hits all of them alike, and results are quoted as medians.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
import warnings
from typing import Callable, Iterable, Optional

import torch

SECTIONS = ("params", "clustering", "training", "quality", "overhead", "inference", "qlora")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
STORED = os.path.join(ROOT, "docs", "benchmarks")  # the sections' committed JSON (and the main job's)


# ------------------------------------------------------------------------------------------- environment
def quiet() -> None:
    """Silence the libraries' progress bars and advisory warnings (they would bury the tables)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    try:
        from datasets.utils.logging import disable_progress_bar, set_verbosity_error

        disable_progress_bar()
        set_verbosity_error()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def set_threads(n: int) -> int:
    """Pin torch's intra-op threads (and inter-op threads, where torch still allows it). Returns the count."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only possible before the first parallel op
        pass
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(name: str) -> str:
    """An installed distribution's version, or "absent"."""
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, torch and library versions, threads, date, load."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": version("peft"),
        "trl": version("trl"),
        "transformers": version("transformers"),
        "k-means-constrained": version("k-means-constrained"),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['cuda']}" if info.get("cuda") else ""
    return (f"{info['date']}; {info['cpu']}, {info['usable_cores']} usable cores, torch {info['torch']}, "
            f"{info['threads']} threads, load average {info['load_avg_1min']} at start{gpu}")


def say(*parts) -> None:
    print(*parts, flush=True)


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- timing
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 0,
                limits: Optional[dict[str, int]] = None) -> dict[str, list[float]]:
    """Run the candidates in turn, ``warmup`` untimed rounds then ``repeats`` timed ones (A, B, C, A, B, C...).

    ``limits`` caps the timed runs of some candidates (e.g. a slow reference timed once): a candidate stops
    taking part once it has its count. Returns the list of seconds per candidate."""
    limits = limits or {}
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for i in range(repeats):
        for name, fn in candidates.items():
            if i < limits.get(name, repeats):
                times[name].append(timed(fn))
    return times


class Clock:
    """Seconds since it was made, against a budget in seconds (None: no limit)."""

    def __init__(self, budget: Optional[float] = None) -> None:
        self.start, self.budget = time.perf_counter(), budget
        self.skipped = False  # a run that was needed was left out past the budget (`skip`): the report says so

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.elapsed()

    def out(self) -> bool:
        return self.left() < 0

    def skip(self) -> bool:
        """Whether something not done yet must be left out (past the budget); remembered in `skipped`."""
        out = self.out()
        self.skipped = self.skipped or out
        return out


# ------------------------------------------------------------------------------------------------ JSON
def write_json(path: str, data: dict) -> None:
    """`data` as indented JSON at `path`, written to a staging file first (a killed run leaves no half file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staging = f"{path}.tmp"
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, default=str)
    os.replace(staging, path)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# -------------------------------------------------------------------------------------------- Markdown
def table(headers: list[str], rows: list[list], align: Optional[str] = None) -> str:
    """A Markdown table; ``align`` is one letter per column, ``l`` or ``r`` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def status(met: Optional[bool]) -> str:
    return "not measured" if met is None else ("**met**" if met else "**missed**")


def fmt_s(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    if seconds >= 100:
        return f"{seconds:.0f}"
    if seconds >= 1:
        return f"{seconds:.2f}"
    if seconds >= 0.01:
        return f"{seconds:.3f}"
    return f"{seconds * 1e3:.2f} ms"


def fmt_mib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 20:.2f}"


def target(name: str, goal: str, measured: str, met: Optional[bool], note: str = "") -> dict:
    """One row of the targets summary."""
    return {"target": name, "goal": goal, "measured": measured, "met": met, "note": note}


# ----------------------------------------------------------------------------------------------- plots
def pyplot():
    """matplotlib's pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_plot(fig, plot_dir: Optional[str], name: str) -> Optional[str]:
    """Save a figure as ``plot_dir/name`` and return its file name (None when plots are off)."""
    plt = pyplot()
    if plot_dir is None or plt is None:
        if plt is not None:
            plt.close(fig)
        return None
    os.makedirs(plot_dir, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, name), dpi=110)
    plt.close(fig)
    return name


# ------------------------------------------------------------------------------------------------ models
def smollm2():
    """(model, tokenizer, name) of the embedded SmolLM2-135M-Instruct, fp32: the one place the sections load it."""
    from idlora_trl_app.smollm2 import MODEL_NAME, load_smollm2

    model, tokenizer = load_smollm2()
    return model, tokenizer, MODEL_NAME


def tiny_llama(vocab: int = 128, hidden: int = 64, layers: int = 2, seed: int = 0, **extra):
    """A small random Llama (for ``--smoke``): nothing is read from disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, **extra)
    return LlamaForCausalLM(config).float()


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer(texts: Iterable[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in memory on ``texts``, with a ChatML template (for ``--smoke``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(list(texts), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", unk_token="<|unk|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok
