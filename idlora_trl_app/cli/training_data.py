"""The user's data for `idlora-trl sft` / `dpo`: `--dataset_name` (a file, a saved dataset, a cached Hub dataset) or
TRL's mixture (`datasets:` in a --config file), `--eval_dataset`, and the columns TRL trains on. Problems are
`UsageError`s naming the option. (Without a dataset: the built-in data, `main_job.py`.)"""

from __future__ import annotations

from typing import Optional

from .errors import UsageError, first_line


def user_data(script_args, dataset_args) -> Optional[str]:
    """What the user gave for training data (--dataset_name or a `datasets:` mixture), None for the built-in data."""
    if dataset_args.datasets:
        return (f"mixture of {len(dataset_args.datasets)} dataset(s) "
                + ", ".join(d.path for d in dataset_args.datasets))
    return script_args.dataset_name


def user_dataset(source: str, kind: str, script, option: str = "--dataset_name", split: Optional[str] = None):
    """A user's dataset (`trl.ScriptArguments` gives the split and configuration); problems are `UsageError`s."""
    from ..data import DataError, load_dataset

    try:
        return load_dataset(source, kind, split=split or script.dataset_train_split,
                            config_name=script.dataset_config)
    except DataError as error:
        raise UsageError(f"{option}: {error}") from error


def mixture_dataset(mixture, kind: str, script):
    """TRL's dataset mixture (`datasets:` in a --config file), loaded by `trl.get_dataset` as `trl sft` loads it:
    `(train, test)`, the `--dataset_train_split` and, when `test_split_size` made one, the `--dataset_test_split`
    (else None). Problems are `UsageError`s."""
    from trl import get_dataset

    from ..data import DataError, check_columns, no_progress_bars

    try:
        with no_progress_bars():
            splits = get_dataset(mixture)
    except Exception as error:  # datasets' own errors: a missing file, an unknown builder, mismatched columns
        raise UsageError(f"datasets (the --config file's mixture): cannot load it: {first_line(error)}") from error
    if script.dataset_train_split not in splits:
        raise UsageError(f"datasets: the mixture has splits {sorted(splits)}, not --dataset_train_split "
                         f"{script.dataset_train_split!r}")
    train = splits[script.dataset_train_split]
    try:
        check_columns(train.column_names, kind, "datasets")
    except DataError as error:
        raise UsageError(f"datasets: {error}") from error
    return train, splits.get(script.dataset_test_split)


def user_rows(script_args, dataset_args, job_args, kind: str):
    """`(train, test)`: the user's training rows, and the held-out rows of a mixture's `test_split_size` (used when
    no --eval_dataset is given, as `trl sft` does; else None)."""
    if dataset_args.datasets:
        train, test = mixture_dataset(dataset_args, kind, script_args)
    else:
        train, test = user_dataset(script_args.dataset_name, kind, script_args), None
    if job_args.max_train_samples:
        train = train.select(range(min(job_args.max_train_samples, len(train))))
    return train, (test if job_args.eval_dataset is None else None)


def eval_rows(dataset, limit: int, source: str = "--eval_dataset") -> list[dict]:
    """Held-out rows scored by generation: `prompt` and `completion`, the first `limit` of each task (0: all)."""
    if "prompt" not in dataset.column_names or "completion" not in dataset.column_names:
        raise UsageError(f"{source} needs 'prompt' and 'completion' columns (it is scored by generation), it has "
                         f"{sorted(dataset.column_names)}")
    rows = dataset.to_list()
    if limit:
        counts: dict[str, int] = {}
        kept = []
        for row in rows:
            task = row.get("task") or "dataset"
            if counts.get(task, 0) < limit:
                counts[task] = counts.get(task, 0) + 1
                kept.append(row)
        rows = kept
    return rows


def training_columns(dataset, columns: tuple[str, ...]):
    """Keep only the columns TRL trains on (built-in bookkeeping columns such as `task` are dropped)."""
    return dataset.remove_columns([c for c in dataset.column_names if c not in columns])
