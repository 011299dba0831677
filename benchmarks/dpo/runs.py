"""One run of the DPO protocol: train one adapter with TRL's DPO on the safety set, score it, write one JSON.

The same storage as the SFT protocol (`benchmarks.quality.runs`): a run is a `Spec` (method, settings, rate,
seed), stored as `<results dir>/<spec.key(setup)>.json`, its adapter in `<work dir>/<key>/`, so the protocol
resumes over sittings and the test split is scored only for the rates validation chooses.

Scores, with the reference being the base model (the adapter disabled, as the trainers train against):
- reward of a completion: `beta * (log p_policy - log p_reference)`, summed over the completion's tokens
  (teacher-forced through `idlora_trl_app.evaluation.answer_nll`, the chat template as in training);
- per pair: margin = reward(chosen) - reward(rejected); reward accuracy = share of pairs with a positive margin;
  preference loss = mean of `-log sigmoid(margin)` (DPO's sigmoid loss), the one number validation ranks rates on;
- on the test split only: refusal rates (greedy replies, `is_refusal`) on the held-out harmful prompts (higher
  is safer) and benign prompts (lower is more helpful).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import math
import os
import time

import torch

from benchmarks.quality.runs import Bench, Spec, peft_config  # the SFT protocol's adapters: LoRA r=p, ID-LoRA r=4p

VALIDATION_REQUESTS = 6  # harmful and benign train requests held out (by request) for choosing the rate


def splits() -> dict[str, list[dict]]:
    """train / validation / test pairs; validation is the last `VALIDATION_REQUESTS` harmful and benign train
    requests, every framing of them, so no validation request is trained on."""
    from idlora_trl_app.data import dpo_rows
    from idlora_trl_app.data.safety import BENIGN_TRAIN, HARMFUL_TRAIN

    held = HARMFUL_TRAIN[-VALIDATION_REQUESTS:] + list(BENIGN_TRAIN)[-VALIDATION_REQUESTS:]
    asks = lambda row, acts: any(act in row["prompt"][0]["content"] for act in acts)  # noqa: E731
    train = dpo_rows("train")
    return dict(train=[r for r in train if not asks(r, held)], validation=[r for r in train if asks(r, held)],
                test=dpo_rows("test"))


def preference_scores(model, tokenizer, pairs: list[dict], beta: float) -> dict:
    """Reward accuracy, mean margin and sigmoid loss of `model` (a PeftModel) against its own base."""
    from idlora_trl_app.evaluation import answer_nll

    def logps() -> dict[str, float]:  # one "task" per completion: answer_nll returns its mean NLL and token count
        rows = [dict(prompt=pair["prompt"], completion=pair[side], task=f"{i}-{side}")
                for i, pair in enumerate(pairs) for side in ("chosen", "rejected")]
        return {key: -mean_nll * count for key, (mean_nll, count) in answer_nll(model, tokenizer, rows).items()}

    policy = logps()
    with model.disable_adapter():
        reference = logps()
    margins = [beta * ((policy[f"{i}-chosen"] - reference[f"{i}-chosen"])
                       - (policy[f"{i}-rejected"] - reference[f"{i}-rejected"])) for i in range(len(pairs))]
    return dict(accuracy=sum(m > 0 for m in margins) / len(margins), margin=sum(margins) / len(margins),
                loss=sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins) / len(margins))


class DPOBench(Bench):
    """The model, data and folders every run of the DPO protocol shares: `quality.runs.Bench`'s storage, DPO runs."""

    def __init__(self, base, tokenizer, data: dict, setup: dict, results_dir: str, work_dir: str, log=print) -> None:
        super().__init__(base, tokenizer, data["train"], data["validation"], data["test"], setup, results_dir,
                         work_dir, log=log)

    def _args(self, spec: Spec, output_dir: str):
        from trl import DPOConfig

        s = self.setup
        return DPOConfig(output_dir=output_dir, max_steps=s["steps"], per_device_train_batch_size=s["batch"],
                         learning_rate=spec.lr, lr_scheduler_type=s["scheduler"], warmup_steps=s["warmup"],
                         max_length=s["max_length"], beta=s["beta"], loss_type=list(s["loss_type"]), logging_steps=1,
                         seed=spec.seed, data_seed=spec.seed, use_cpu=not torch.cuda.is_available(), bf16=False,
                         fp16=False, report_to="none", save_strategy="no", disable_tqdm=True,
                         dataloader_num_workers=0)

    def _train(self, spec: Spec) -> dict:
        from datasets import Dataset
        from transformers import set_seed
        from trl import DPOTrainer

        from idlora_trl import IDLoRADPOTrainer

        set_seed(spec.seed)
        out_dir = os.path.join(self.work_dir, spec.key(self.setup))
        train = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in self.train])
        with contextlib.redirect_stdout(io.StringIO()):
            cls = IDLoRADPOTrainer if spec.method == "ID-LoRA" else DPOTrainer
            trainer = cls(model=copy.deepcopy(self.base), args=self._args(spec, out_dir), train_dataset=train,
                          processing_class=self.tokenizer,
                          peft_config=peft_config(spec, self.setup["p"], self.setup["targets"]))
            start = time.perf_counter()
            trainer.train()
            train_s = time.perf_counter() - start
        model = trainer.model
        model.save_pretrained(out_dir)
        validation = preference_scores(model.eval(), self.tokenizer, self.validation, self.setup["beta"])
        record = dict(method=spec.method, settings=dict(spec.settings), label=spec.label, lr=spec.lr, seed=spec.seed,
                      setup=self.setup, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      train_s=train_s, losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
                      validation=validation)
        self.log(f"dpo: {spec.label} lr {spec.lr:g} seed {spec.seed}: validation loss {validation['loss']:.4f}, "
                 f"reward accuracy {validation['accuracy']:.3f}, train {train_s:.0f} s")
        del trainer, model
        gc.collect()
        return record

    def _score_test(self, spec: Spec) -> dict:
        from idlora_trl_app.data import refusal_prompts
        from idlora_trl_app.evaluation import refusal_rates

        model = self.saved_adapter(spec)
        scores = preference_scores(model, self.tokenizer, self.test, self.setup["beta"])
        refusals = refusal_rates(model, self.tokenizer, refusal_prompts("test"), max_new_tokens=24)
        scores["refusal"] = {kind: [r.correct, r.total] for kind, r in refusals.items()}
        self.log(f"dpo: {spec.label} lr {spec.lr:g} seed {spec.seed}: test reward accuracy {scores['accuracy']:.3f}, "
                 f"refusals harmful {refusals['harmful'].accuracy:.2f} benign {refusals['benign'].accuracy:.2f}")
        del model
        gc.collect()
        return scores
