"""The defaults of `idlora-trl sft` / `dpo`, under the options' own names (TRL's, `idlora_r`, `eval_samples`): what the
commands train with when no option says otherwise, the main job's settings. Public, so that the benchmarks and the
examples train with the same settings (`SFTConfig(learning_rate=SFT_DEFAULTS["learning_rate"], ...)`)."""

# Not o_proj/down_proj by default: their outputs are residual-stream channels with massive outliers (SmolLM2's
# down_proj skeleton outputs reach |x| ~ 2.5e4), and the ID-LoRA update is quadratic in the gathered outputs
# (alpha_i = <T, x_i> times x_i), so adapting them made training diverge (loss 1.5 -> 20 at lr 3e-3).
# The SFT learning rate is measured, not guessed (docs/BENCHMARKS.md §4): on a validation split ID-LoRA's best rates
# are 2.5e-4-5e-4 (flat), and 1e-3 and above overshoot on some seeds; at this job's own size 5e-4 beat 1e-3.
# The DPO rate is measured too (docs/benchmarks/dpo.md): on requests held out of the training pairs, ID-LoRA's
# validation preference loss is lowest at 1.5e-3 (0.49, against 0.90 at the 3e-3 this default used to be).
# The seed is 0 (TRL's is 42): it fixes the built-in data's order and the figures of the README.
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,gate_proj,up_proj"
SFT_DEFAULTS = dict(idlora_r=32, lora_target_modules=DEFAULT_TARGETS.split(","), learning_rate=5e-4,
                    lr_scheduler_type="cosine", warmup_steps=3, max_steps=60, per_device_train_batch_size=8,
                    max_length=128, logging_steps=5, seed=0, eval_samples=32, output_dir="outputs/sft-idlora")
# DPO's loss: DPO plus an NLL term on the chosen replies (TRL's loss_type ["sigmoid", "sft"], weights 1 and 1, as in
# RPO); plain DPO lowers both replies' likelihood on this small model and garbles its generation.
DPO_DEFAULTS = dict(idlora_r=32, lora_target_modules=DEFAULT_TARGETS.split(","), learning_rate=1.5e-3,
                    lr_scheduler_type="cosine", warmup_steps=2, max_steps=20, per_device_train_batch_size=8,
                    max_length=128, logging_steps=5, seed=0, eval_samples=24, beta=0.1, loss_type=["sigmoid", "sft"],
                    output_dir="outputs/dpo-idlora")
