"""IDLoRASFTTrainer and IDLoRADPOTrainer on a tiny model: they learn, train only the adapter, and DPO's
reference is the base model (or an exact frozen copy of a pre-trained adapter)."""

import copy

import pytest
import torch
from helpers import make_chat_llama, make_tokenizer
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from trl import DPOConfig, SFTConfig

from idlora_trl import IDLoRAConfig, IDLoRADPOTrainer, IDLoRASFTTrainer, get_indices
from idlora_trl.hookspecs import hookimpl
from idlora_trl.trainers import resolve_peft_config

CPU = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
           seed=0, logging_steps=1, max_length=64, per_device_train_batch_size=8, lr_scheduler_type="constant")


def sft_dataset():
    rows = [{"prompt": [{"role": "user", "content": f"what is {a} plus {b}?"}],
             "completion": [{"role": "assistant", "content": f"it is {a + b}."}]}
            for a in range(8) for b in range(8)]
    return Dataset.from_list(rows)


def dpo_dataset():
    rows = [{"prompt": [{"role": "user", "content": f"what is {a} plus {b}?"}],
             "chosen": [{"role": "assistant", "content": f"it is {a + b}."}],
             "rejected": [{"role": "assistant", "content": "i cannot help with that"}]}
            for a in range(6) for b in range(6)]
    return Dataset.from_list(rows)


def idlora(**overrides):
    return IDLoRAConfig(**{"r": 8, "num_clusters": 2, "task_type": "CAUSAL_LM", **overrides})


def base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "idlora_" not in n}


def assert_only_adapter_changed(before, trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
             for n, p in model.named_parameters() if "idlora_" not in n}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    B = [p for n, p in model.named_parameters() if ".idlora_B.default." in n]
    assert B and any(p.abs().sum() > 0 for p in B)  # B started at zero: it was trained


def test_sft_learns_and_trains_only_the_adapter(tmp_path, capsys):
    tok = make_tokenizer()
    model = make_chat_llama(tok)
    before = base_state(model)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=20, learning_rate=5e-2, **CPU)
    trainer = IDLoRASFTTrainer(model, args=args, train_dataset=sft_dataset(), processing_class=tok,
                               peft_config=idlora())
    assert "| ID-LoRA r=8 |" in capsys.readouterr().out  # the parameter table is printed once
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert_only_adapter_changed(before, trainer)


def test_sft_accepts_a_model_path(tmp_path):
    tok = make_tokenizer()
    make_chat_llama(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, **CPU)
    trainer = IDLoRASFTTrainer(str(tmp_path / "base"), args=args, train_dataset=sft_dataset(),
                               processing_class=tok, peft_config=idlora(num_clusters=3))
    assert trainer.model.peft_config["default"].num_clusters == 3
    trainer.train()


def test_default_peft_config_is_idlora():
    config = resolve_peft_config(make_chat_llama(make_tokenizer()), None, "IDLoRASFTTrainer")
    assert isinstance(config, IDLoRAConfig) and config.task_type == "CAUSAL_LM"
    with pytest.raises(TypeError, match="PeftModel without an ID-LoRA adapter"):
        resolve_peft_config(get_peft_model(make_chat_llama(make_tokenizer()), LoraConfig()), None, "X")


def test_trainers_refuse_other_peft_configs(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(TypeError, match=r"peft_config is a LoraConfig.*IDLoRAConfig"):
        IDLoRASFTTrainer(make_chat_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **CPU),
                         train_dataset=sft_dataset(), processing_class=tok, peft_config=LoraConfig())


@pytest.mark.parametrize("trainer_cls", [IDLoRASFTTrainer, IDLoRADPOTrainer])
def test_two_trainers_with_one_seed_start_from_the_same_router(tmp_path, trainer_cls):
    """PEFT draws T at random; the trainers seed before TRL wraps the model, whatever TRL's version (TRL 1.9,
    Axolotl's pin, wraps it before the Trainer seeds). The global generator is disturbed in between, as a script's
    own work would."""
    tok = make_tokenizer()
    config_cls, data = (SFTConfig, sft_dataset) if trainer_cls is IDLoRASFTTrainer else (DPOConfig, dpo_dataset)
    routers = []
    for run in range(2):
        base = make_chat_llama(tok)  # (seeds the generator itself)
        torch.manual_seed(100 + run)
        trainer = trainer_cls(base, args=config_cls(output_dir=str(tmp_path / str(run)), **CPU),
                              train_dataset=data(), processing_class=tok, peft_config=idlora())
        model = trainer.accelerator.unwrap_model(trainer.model)
        routers.append({n: p.detach().clone() for n, p in model.named_parameters() if ".idlora_T.default." in n})
    assert routers[0] and routers[0].keys() == routers[1].keys()
    assert all(torch.equal(routers[0][n], routers[1][n]) for n in routers[0])


def reference_logps(base, batch):
    """Sum of the base model's log-probs of the completion tokens, computed by hand."""
    logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(1)


def test_dpo_reference_is_the_base_model(tmp_path):
    tok = make_tokenizer()
    model = make_chat_llama(tok)
    base = copy.deepcopy(model).eval()
    before = base_state(model)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=12, learning_rate=1e-2, beta=0.1, **CPU)
    trainer = IDLoRADPOTrainer(model, ref_model=None, args=args, train_dataset=dpo_dataset(),
                               processing_class=tok, peft_config=idlora())
    trainer.train()
    logs = [log for log in trainer.state.log_history if "rewards/margins" in log]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert logs[-1]["rewards/accuracies"] >= 0.75
    assert_only_adapter_changed(before, trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        expected = reference_logps(base, batch)
        policy = reference_logps(trainer.model, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(policy, expected, atol=1e-3)  # the policy did move away from the reference


def test_dpo_on_a_pretrained_idlora_model_copies_it_as_reference(tmp_path):
    tok = make_tokenizer()
    peft_model = get_peft_model(make_chat_llama(tok), idlora(init_weights=False))
    indices = get_indices(peft_model)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=3, learning_rate=1e-2, **CPU)
    trainer = IDLoRADPOTrainer(peft_model, ref_model=None, args=args, train_dataset=dpo_dataset(),
                               processing_class=tok)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert set(model.peft_config) == {"default", "ref"}
    assert all(torch.equal(indices[n], t) for n, t in get_indices(model, "ref").items())
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}
    assert ref_params and all(not p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    trainer.train()
    assert all(torch.equal(p, ref_params[n]) for n, p in model.named_parameters() if ".ref." in n)
    assert any(not torch.equal(p, ref_params[n.replace(".default.", ".ref.")])
               for n, p in model.named_parameters() if ".default." in n)


class EveryOtherRow:
    """A third-party strategy: rows 0, 2, 4, ... in k groups of r."""

    @hookimpl
    def idlora_selection_names(self):
        return ["every-other"]

    @hookimpl
    def idlora_select_rows(self, weight, module_name, config):
        if config.selection == "every-other":
            k, r = config.num_clusters, config.r
            return torch.arange(0, 2 * k * r, 2).reshape(k, r)


@pytest.mark.parametrize("trainer_cls", [IDLoRASFTTrainer, IDLoRADPOTrainer])
def test_third_party_plugin_rows_are_used_by_both_trainers(tmp_path, register_plugin, trainer_cls):
    register_plugin(EveryOtherRow())
    tok = make_tokenizer()
    config_cls, data = (SFTConfig, sft_dataset()) if trainer_cls is IDLoRASFTTrainer else (DPOConfig, dpo_dataset())
    trainer = trainer_cls(make_chat_llama(tok), args=config_cls(output_dir=str(tmp_path), max_steps=1, **CPU),
                          train_dataset=data, processing_class=tok, peft_config=idlora(selection="every-other"))
    trainer.train()
    tables = get_indices(trainer.accelerator.unwrap_model(trainer.model))
    assert len(tables) == 14
    assert all(t.tolist() == [list(range(0, 16, 2)), list(range(16, 32, 2))] for t in tables.values())


def test_trained_adapter_saves_and_reloads(tmp_path):
    tok = make_tokenizer()
    base = make_chat_llama(tok)
    base_copy = copy.deepcopy(base)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=5, learning_rate=1e-2, **CPU)
    trainer = IDLoRASFTTrainer(base, args=args, train_dataset=sft_dataset(), processing_class=tok,
                               peft_config=idlora())
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    ids = tok("what is 2 plus 3?", return_tensors="pt").input_ids
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = PeftModel.from_pretrained(base_copy, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("trainer_cls", [IDLoRASFTTrainer, IDLoRADPOTrainer])
def test_an_overflowing_update_is_named_after_a_non_finite_loss(tmp_path, trainer_cls):
    """The forward never checks for overflow (no host sync per module); when a step's loss is not finite the
    trainer runs that batch again under `overflow_check`, and the error names the module, before any optimizer
    step. Here one module's router and B are set so large that its update overflows float32."""
    tok = make_tokenizer()
    if trainer_cls is IDLoRASFTTrainer:
        args, data = SFTConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-3, **CPU), sft_dataset()
    else:
        args, data = DPOConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-3, **CPU), dpo_dataset()
    trainer = trainer_cls(make_chat_llama(tok), args=args, train_dataset=data, processing_class=tok,
                          peft_config=idlora(target_modules=["up_proj"]))
    layer = trainer.accelerator.unwrap_model(trainer.model).base_model.model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.idlora_T["default"].weight.fill_(1e20)
        layer.idlora_B["default"].weight.fill_(1e20)
    with pytest.raises(FloatingPointError, match=r"module 'model\.layers\.1\.mlp\.up_proj' turned a finite output"):
        trainer.train()
    assert trainer.state.global_step == 0
