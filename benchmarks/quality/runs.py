"""One run of the quality protocol: fine-tune one adapter with TRL, score it, write one JSON.

A run is a `Spec` (method, ID-LoRA settings, learning rate, seed). Its result is stored as
`<results dir>/<spec.key()>.json`, so the protocol resumes from whatever runs exist, over several sittings.
Its adapter is saved in `<work dir>/<key>/` (not in the repository), so the test split can be scored later
for the runs the validation split selects, without training them again.

Scores (`idlora_trl_app.evaluation`):
- validation: mean answer NLL per task (teacher-forced, answer tokens only), the one number the learning-rate
  grid is chosen on;
- test: answer NLL per task and exact-match accuracy per task (greedy generation).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import io
import json
import os
import time
from typing import Optional

import torch

from benchmarks.common import read_json, write_json
from benchmarks.stats import mean

METHODS = ("LoRA", "DoRA", "VeRA", "ID-LoRA")  # the kinds of adapter a run trains
PAPER = (("router_norm", "none"), ("selection", "pmrc"))  # the paper's router and rows, whatever the defaults are


def named_methods(p: int) -> dict[str, tuple[str, tuple]]:
    """The protocol's methods by name: name -> (kind, settings that differ from the kind's defaults at rank p).

    "ID-LoRA" is the library's default, whatever it is when the run is made; "ID-LoRA (paper)" names the paper's
    settings, so its stored runs keep their meaning when the default changes."""
    r = 4 * p
    return {
        "LoRA": ("LoRA", ()), "DoRA": ("DoRA", ()), "VeRA": ("VeRA", ()),
        "LoRA r=p/2": ("LoRA", (("r", p // 2),)),  # about ID-LoRA's parameter count: the parameter-matched reference
        "ID-LoRA": ("ID-LoRA", ()),
        "ID-LoRA (paper)": ("ID-LoRA", PAPER),
        "ID-LoRA rms": ("ID-LoRA", (("router_norm", "rms"),)),
        "ID-LoRA rms, s=8": ("ID-LoRA", (("idlora_alpha", 8.0 * r), ("router_norm", "rms"))),
        "ID-LoRA rms, random rows": ("ID-LoRA", (("router_norm", "rms"), ("selection", "random"))),
        "ID-LoRA rms, pmrc-qr": ("ID-LoRA", (("router_norm", "rms"), ("selection", "pmrc-qr"))),
    }


def method_name(record: dict, p: int) -> str | None:
    """The name (`named_methods`) of a stored run's method, or None."""
    settings = tuple(sorted((k, v) for k, v in record.get("settings", {}).items()))
    for name, (kind, wanted) in named_methods(p).items():
        if kind == record["method"] and tuple(sorted(wanted)) == settings:
            return name
    return None


@dataclasses.dataclass(frozen=True)
class Spec:
    method: str  # one of METHODS
    lr: float
    seed: int
    settings: tuple = ()  # ID-LoRA settings that differ from the default, as sorted (name, value) pairs

    @property
    def label(self) -> str:
        return self.method + "".join(f", {k}={v}" for k, v in self.settings)

    def key(self, setup: dict) -> str:
        """A file name that changes with anything that changes the run (setup = steps, data, model...)."""
        blob = json.dumps([self.method, self.lr, self.seed, list(self.settings), setup], sort_keys=True)
        return f"{self.method.lower()}-lr{self.lr:g}-s{self.seed}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def peft_config(spec: Spec, p: int, targets: list[str]):
    """LoRA/DoRA at rank p (or the spec's `r`; lora_alpha = 2r), VeRA at rank 32p (PEFT's shared random
    projections), ID-LoRA at rank 4p with the library's defaults plus the spec's settings."""
    from peft import LoraConfig, VeraConfig

    from idlora_trl import IDLoRAConfig

    if spec.method == "ID-LoRA":
        return IDLoRAConfig(**{"r": 4 * p, **dict(spec.settings)}, target_modules=targets, task_type="CAUSAL_LM")
    if spec.method == "VeRA":
        return VeraConfig(r=32 * p, target_modules=targets, task_type="CAUSAL_LM", projection_prng_key=0)
    r = dict(spec.settings).get("r", p)
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
                      use_dora=spec.method == "DoRA")


def sft_args(spec: Spec, setup: dict, output_dir: str):
    from trl import SFTConfig

    return SFTConfig(output_dir=output_dir, max_steps=setup["steps"], per_device_train_batch_size=setup["batch"],
                     learning_rate=spec.lr, lr_scheduler_type=setup["scheduler"], warmup_steps=setup["warmup"],
                     logging_steps=1, max_length=setup["max_length"], seed=spec.seed, data_seed=spec.seed,
                     use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, gradient_checkpointing=False,
                     report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)


def rows_sha(*splits) -> str:
    """A short hash of the rows of every split (lists of dicts or `datasets.Dataset`s), in order."""
    blob = json.dumps([list(split) for split in splits], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


class Bench:
    """The model, data and folders that every run of one protocol shares; a protocol's kind of run is `_train` and
    `_score_test` (SFT here, DPO in `benchmarks.dpo.runs`)."""

    def __init__(self, base, tokenizer, train, validation: list[dict], test: list[dict], setup: dict,
                 results_dir: str, work_dir: str, log=print) -> None:
        self.base, self.tokenizer, self.train, self.setup = base, tokenizer, train, setup
        self.validation, self.test = validation, test
        self.results_dir, self.work_dir, self.log = results_dir, work_dir, log
        self.index_files: dict[str, str] = {}  # one clustering per decomposition setting
        self.rows_sha = rows_sha(train, validation, test)
        os.makedirs(results_dir, exist_ok=True)
        os.makedirs(work_dir, exist_ok=True)

    # ------------------------------------------------------------------ storage
    def path(self, spec: Spec) -> str:
        return os.path.join(self.results_dir, spec.key(self.setup) + ".json")

    def load(self, spec: Spec) -> Optional[dict]:
        """The stored record of `spec`, or None. A record trained on other rows than this bench's is an error: the
        file name hashes the setup (with the task set's name, `data`), not the rows, so a task set changed without a
        new name would otherwise resume runs of the old one. Records older than the check carry no `rows_sha`."""
        try:
            record = read_json(self.path(spec))
        except FileNotFoundError:
            return None
        if record.get("rows_sha", self.rows_sha) != self.rows_sha:
            raise SystemExit(
                f"benchmarks: {self.path(spec)} was trained on other rows (rows_sha {record['rows_sha']}, these are "
                f"{self.rows_sha}) under the same task-set name ({self.setup.get('data')!r}): the task set changed "
                "without a new name. Give it one (`DATA` in benchmarks/quality/tasks.py or the DPO protocol's), or "
                "move the stale runs out of the folder.")
        return record

    def _save(self, spec: Spec, record: dict) -> None:
        write_json(self.path(spec), record)  # a killed run never leaves half a file

    # ------------------------------------------------------------------ runs
    def run(self, spec: Spec, score_test: bool = False) -> dict:
        """The stored record of `spec`, training it first if needed; with `score_test`, also its test scores."""
        record = self.load(spec)
        if record is None:
            record = dict(self._train(spec), rows_sha=self.rows_sha)  # the rows it trained on: `load` checks them
            self._save(spec, record)
        if score_test and "test" not in record:
            test = self._score_test(spec)
            # Read again: on a machine without the adapter, `saved_adapter` trained the run again and stored that
            # training's losses and validation, the ones these test scores belong to.
            record = self.load(spec)
            record["test"] = test
            self._save(spec, record)
        return record

    def _prepare_indices(self, config) -> bool:
        key = json.dumps([config.decomposition_spec(), sorted(config.target_modules)], sort_keys=True)
        path = self.index_files.get(key) or os.path.join(self.work_dir, "indices-" + hashlib.sha1(
            key.encode()).hexdigest()[:10] + ".safetensors")
        if os.path.isfile(path):
            config.indices_path = path
            return False
        self.index_files[key] = path
        return True

    def _train(self, spec: Spec) -> dict:
        from transformers import set_seed
        from trl import SFTTrainer

        from idlora_trl import IDLoRASFTTrainer, get_indices, save_indices
        from idlora_trl_app.evaluation import answer_nll

        config = peft_config(spec, self.setup["p"], self.setup["targets"])
        clusters = spec.method == "ID-LoRA" and self._prepare_indices(config)
        set_seed(spec.seed)  # the adapter is initialised when the trainer is built
        out_dir = os.path.join(self.work_dir, spec.key(self.setup))
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            cls = IDLoRASFTTrainer if spec.method == "ID-LoRA" else SFTTrainer
            trainer = cls(model=copy.deepcopy(self.base), args=sft_args(spec, self.setup, out_dir),
                          train_dataset=self.train, processing_class=self.tokenizer, peft_config=config)
            setup_s = time.perf_counter() - start
            if clusters:
                save_indices(self.index_files[json.dumps([config.decomposition_spec(), sorted(
                    config.target_modules)], sort_keys=True)], get_indices(trainer.model), config.decomposition_spec())
            start = time.perf_counter()
            trainer.train()
            train_s = time.perf_counter() - start
        model = trainer.model
        model.save_pretrained(out_dir)
        start = time.perf_counter()
        validation = answer_nll(model, self.tokenizer, self.validation, batch_size=32)
        record = dict(method=spec.method, settings=dict(spec.settings), label=spec.label, lr=spec.lr, seed=spec.seed,
                      setup=self.setup, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      setup_s=setup_s, clustered=clusters, train_s=train_s,
                      losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
                      validation={"nll": {t: v[0] for t, v in validation.items()}},
                      validation_s=time.perf_counter() - start, finite=all(
                          torch.isfinite(p).all().item() for p in model.parameters() if p.requires_grad))
        self.log(f"quality: {spec.label} lr {spec.lr:g} seed {spec.seed}: validation NLL "
                 f"{mean(record['validation']['nll'].values()):.4f}, train {train_s:.0f} s")
        del trainer, model
        gc.collect()
        return record

    def saved_adapter(self, spec: Spec):
        """The trained adapter of `spec` on a copy of the base, in eval mode (trained again if this machine has
        no saved copy of it)."""
        from peft import PeftModel

        import idlora_trl  # noqa: F401  (registers IDLORA with PEFT: a resumed process may score before it trains)

        out_dir = os.path.join(self.work_dir, spec.key(self.setup))
        if not os.path.isfile(os.path.join(out_dir, "adapter_config.json")):  # another machine: train again
            self._save(spec, dict(self._train(spec), rows_sha=self.rows_sha))
        return PeftModel.from_pretrained(copy.deepcopy(self.base), out_dir).eval()

    def _score_test(self, spec: Spec) -> dict:
        from idlora_trl_app.evaluation import answer_nll, evaluate_accuracy

        model = self.saved_adapter(spec)
        start = time.perf_counter()
        nll = answer_nll(model, self.tokenizer, self.test, batch_size=32)
        scores = evaluate_accuracy(model, self.tokenizer, self.test, batch_size=32)
        result = {"nll": {t: v[0] for t, v in nll.items()},
                  "accuracy": {t: [s.correct, s.total] for t, s in scores.items()},
                  "eval_s": time.perf_counter() - start}
        self.log(f"quality: {spec.label} lr {spec.lr:g} seed {spec.seed}: test accuracy "
                 f"{mean(c / t for c, t in result['accuracy'].values()):.3f}, NLL {mean(result['nll'].values()):.4f}")
        del model
        gc.collect()
        return result


def acc(record: dict, task: str | None = None) -> float:
    """A run's test accuracy on `task`, or the mean over tasks."""
    scores = record["test"]["accuracy"]
    return scores[task][0] / scores[task][1] if task else mean(c / t for c, t in scores.values())


def nll(record: dict, split: str = "test") -> float:
    """A run's answer NLL on `split`, mean over tasks."""
    return mean(record[split]["nll"].values())
