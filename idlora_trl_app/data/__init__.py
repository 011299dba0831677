"""Built-in data for `idlora-trl sft` and `idlora-trl dpo`, and loading of users' datasets.

Built-in data is generated in code from a seed (no files, no downloads), in TRL's conversational formats:

- SFT (`sft_dataset`): a multi-task mix of arithmetic word problems, sentiment and short instructions
  (`idlora_trl_app.data.sft_tasks`), prompt-completion rows with `task` and `answer` columns;
- DPO (`dpo_dataset`): a safety set, harmful requests with refusal chosen and benign requests with help
  chosen (`idlora_trl_app.data.safety`), prompt/chosen/rejected rows with a `kind` column.

Each has a `"train"` split and a held-out `"test"` split that shares no item with it; the SFT tasks also have a
`"validation"` split, disjoint from both, for choosing hyper-parameters (`benchmarks/quality/`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Optional

from .safety import refusal_prompts, safety_pairs
from .sft_tasks import TASKS

SPLITS = ("train", "test")  # the safety (DPO) set
SFT_SPLITS = ("train", "validation", "test")
SFT_TASKS = tuple(TASKS)


class DataError(ValueError):
    """A dataset that cannot be used: a bad path, a missing column, an unknown task (one-line message)."""


def _check_split(split: str, splits: tuple[str, ...] = SPLITS) -> None:
    if split not in splits:
        raise DataError(f"unknown split {split!r}; choose one of {splits}")


def parse_tasks(tasks: Optional[Iterable[str] | str]) -> list[str]:
    """`None` or `"all"` -> every task; a comma-separated string or a list -> those tasks, checked."""
    if tasks is None or tasks == "all":
        return list(SFT_TASKS)
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise DataError(f"unknown built-in task(s) {unknown or names}; choose from {', '.join(SFT_TASKS)}")
    return names


def sft_rows(split: str = "train", tasks=None, seed: int = 0, per_task: Optional[int] = None) -> list[dict]:
    """Rows of the built-in SFT tasks, interleaved round-robin so that every prefix is balanced across tasks.
    `per_task` keeps the first `per_task` rows of each task (a fixed, shuffled order)."""
    _check_split(split, SFT_SPLITS)
    lists = [TASKS[name](split, seed)[:per_task] for name in parse_tasks(tasks)]
    rows, longest = [], max(len(rows) for rows in lists)
    for i in range(longest):
        rows.extend(task_rows[i] for task_rows in lists if i < len(task_rows))
    return rows


def sft_dataset(split: str = "train", tasks=None, max_samples: Optional[int] = None, seed: int = 0,
                per_task: Optional[int] = None):
    """The built-in SFT mix as a `datasets.Dataset` (`prompt`, `completion`, `task`, `answer`)."""
    from datasets import Dataset

    rows = sft_rows(split, tasks, seed, per_task)
    return Dataset.from_list(rows[:max_samples] if max_samples else rows)


def dpo_rows(split: str = "train", seed: int = 0) -> list[dict]:
    _check_split(split)
    return safety_pairs(split, seed)


def dpo_dataset(split: str = "train", max_samples: Optional[int] = None, seed: int = 0):
    """The built-in safety preference set as a `datasets.Dataset` (`prompt`, `chosen`, `rejected`, `kind`)."""
    from datasets import Dataset

    rows = dpo_rows(split, seed)
    return Dataset.from_list(rows[:max_samples] if max_samples else rows)


# ------------------------------------------------------------------------------------- users' datasets
SFT_FORMATS = ({"messages"}, {"text"}, {"prompt", "completion"})
DPO_FORMATS = ({"prompt", "chosen", "rejected"}, {"chosen", "rejected"})


def load_dataset(source: str, kind: str, split: str = "train", config_name: Optional[str] = None):
    """A user's dataset for `kind` (`"sft"` or `"dpo"`): a `.jsonl`/`.json` file, a directory written by
    `Dataset.save_to_disk`, or a Hugging Face dataset name (loaded with `datasets.load_dataset`, which needs
    the dataset in the local cache when the Hub is offline). Checks that the columns fit TRL's formats."""
    with no_progress_bars():
        return _load_dataset(source, kind, split, config_name)


@contextlib.contextmanager
def no_progress_bars():
    """Without `datasets`' "Generating train split" bars, which would bury a one-line error."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not quiet:
            enable_progress_bars()


def _load_dataset(source: str, kind: str, split: str, config_name: Optional[str]):
    import datasets

    # A Hub name is "name" or "owner/name"; anything else that does not exist is a missing local path.
    looks_like_file = (source.endswith((".jsonl", ".json")) or source.startswith((".", "/", "~"))
                       or source.count("/") > 1)
    try:
        if os.path.isfile(source):
            if not source.endswith((".jsonl", ".json")):
                raise DataError(f"dataset file {source!r} must be a .jsonl or .json file")
            dataset = datasets.load_dataset("json", data_files=source, split="train")
        elif os.path.isdir(source) and os.path.isfile(os.path.join(source, "dataset_info.json")):
            dataset = datasets.load_from_disk(source)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        elif looks_like_file and not os.path.isdir(source):
            raise DataError(f"dataset file {source!r} does not exist")
        else:
            dataset = datasets.load_dataset(source, config_name, split=split)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot load dataset {source!r}: {message}") from error
    check_columns(dataset.column_names, kind, source)
    if len(dataset) == 0:
        raise DataError(f"dataset {source!r} is empty")
    return dataset


def check_columns(columns: Iterable[str], kind: str, source: str = "dataset") -> None:
    columns = set(columns)
    formats = SFT_FORMATS if kind == "sft" else DPO_FORMATS
    if not any(needed <= columns for needed in formats):
        wanted = " or ".join("+".join(sorted(f)) for f in formats)
        raise DataError(f"{source!r} has columns {sorted(columns)}; {kind} needs {wanted}")


__all__ = ["DataError", "SFT_SPLITS", "SFT_TASKS", "SPLITS", "check_columns", "dpo_dataset", "dpo_rows", "load_dataset",
           "no_progress_bars", "parse_tasks", "refusal_prompts", "sft_dataset", "sft_rows"]
