"""Section 4: held-out accuracy of LoRA, DoRA and ID-LoRA on the built-in multi-task set, and ID-LoRA ablations.

SmolLM2-135M-Instruct (fp32) is fine-tuned with TRL on `idlora_trl.data.sft_dataset("train")` (arithmetic,
sentiment, instructions; generated from seed 0 for every run) and scored by greedy generation on the held-out
`sft_dataset("test", per_task=N)` with `idlora_trl.evaluation.evaluate_accuracy` (exact match per task):
- main comparison, `--seeds` training seeds, run interleaved by seed (LoRA, DoRA, ID-LoRA, LoRA, ...):
  PEFT LoRA and DoRA at rank p through `trl.SFTTrainer(peft_config=LoraConfig(...))`, ID-LoRA at rank 4p
  through `idlora_trl.IDLoRASFTTrainer`, all with the same `SFTConfig`;
- ID-LoRA ablations (`--ablation-seeds`, default 1): selection random / sequential, static router,
  rank_boost 1, k = 2 and 8 (r lowered so that k * r fits the smallest targeted d_out, with a k = 4 control at
  that r). Each changes one setting of the default ID-LoRA.
The clustering seed stays 0 (the decomposition is computed once per setting and reused), so the seed spread
measures the training randomness: router initialisation and data order (and LoRA's A initialisation).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import os
import tempfile
import time

import torch

from common import log, median, pyplot, save_plot, spread, table, tiny_llama, tiny_tokenizer

try:  # the CLI's settings for ID-LoRA SFT
    from idlora_trl.cli.args import DEFAULT_TARGETS, SFT_DEFAULTS
except ImportError:  # the CLI package mid-edit: the same values
    DEFAULT_TARGETS = "q_proj,k_proj,v_proj,gate_proj,up_proj"
    SFT_DEFAULTS = dict(learning_rate=2e-3, lr_scheduler="cosine", warmup_steps=3, batch_size=8, max_length=128)

METHODS = ("LoRA", "DoRA", "ID-LoRA")


def add_arguments(parser) -> None:
    group = parser.add_argument_group("quality")
    group.add_argument("--seeds", type=int, default=3, help="training seeds of the main comparison")
    group.add_argument("--ablation-seeds", type=int, default=1, help="training seeds of each ID-LoRA ablation")
    group.add_argument("--quality-steps", type=int, default=40, help="optimizer steps per run")
    group.add_argument("--quality-batch", type=int, default=SFT_DEFAULTS["batch_size"], help="rows per step")
    group.add_argument("--eval-per-task", type=int, default=32, help="held-out items per task")
    group.add_argument("--quality-p", type=int, default=8, help="LoRA/DoRA rank p; ID-LoRA gets 4p")
    group.add_argument("--lr-idlora", type=float, default=SFT_DEFAULTS["learning_rate"],
                       help="ID-LoRA learning rate (default: the CLI's)")
    group.add_argument("--lr-lora", type=float, default=1e-3, help="LoRA and DoRA learning rate")
    group.add_argument("--lr-sweep", default=None, metavar="SPEC",
                       help="choose each method's lr from a one-seed sweep first, e.g. "
                            "'LoRA=3e-4,1e-3,3e-3;DoRA=3e-4,1e-3,3e-3;ID-LoRA=1e-3,2e-3,4e-3' (by the mean training "
                            "loss of the last quarter of the steps: fresh batches, since a run sees < 1 epoch)")
    group.add_argument("--no-ablations", action="store_true", help="only the main comparison")


# ----------------------------------------------------------------------------------------------- setup
def _targets() -> list[str]:
    return [t.strip() for t in DEFAULT_TARGETS.split(",")]


def _min_d_out(model, targets: list[str]) -> int:
    return min(m.out_features for n, m in model.named_modules()
               if n.split(".")[-1] in targets and isinstance(m, torch.nn.Linear))


def plan(args, min_d_out: int) -> list[dict]:
    """Every run, in the order they execute."""
    p = args.quality_p
    r = 4 * p
    lrs = {"LoRA": args.lr_lora, "DoRA": args.lr_lora, "ID-LoRA": args.lr_idlora}
    runs = []
    for seed in range(args.seeds):
        for method in METHODS:
            runs.append(dict(group="main", label=method, method=method, seed=seed, lr=lrs[method], settings={}))
    if args.no_ablations:
        return runs
    r8 = min(r, min_d_out // 8) // 2 * 2
    ablations = [("selection=random", dict(selection="random")), ("selection=sequential", dict(selection="sequential")),
                 ("router=static", dict(router="static")), ("rank_boost=1", dict(rank_boost=1)),
                 ("k=2", dict(num_clusters=2)), (f"k=8, r={r8}", dict(num_clusters=8, r=r8))]
    if r8 != r:
        ablations.append((f"k=4, r={r8} (control for k=8)", dict(r=r8)))
    for seed in range(args.ablation_seeds):
        for label, settings in ablations:
            runs.append(dict(group="ablation", label=label, method="ID-LoRA", seed=seed, lr=lrs["ID-LoRA"],
                             settings=settings))
    return runs


def _peft_config(run: dict, p: int, targets: list[str]):
    from peft import LoraConfig

    from idlora_trl import IDLoRAConfig

    if run["method"] == "ID-LoRA":
        kwargs = dict(r=4 * p, num_clusters=4, rank_boost=2, router="token", selection="pmrc", seed=0)
        kwargs.update(run["settings"])
        return IDLoRAConfig(target_modules=targets, task_type="CAUSAL_LM", **kwargs)
    return LoraConfig(r=p, lora_alpha=2 * p, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
                      use_dora=run["method"] == "DoRA")


def _sft_config(args, run: dict, output_dir: str):
    from trl import SFTConfig

    return SFTConfig(output_dir=output_dir, max_steps=args.quality_steps, per_device_train_batch_size=args.quality_batch,
                     learning_rate=run["lr"], lr_scheduler_type=SFT_DEFAULTS.get("lr_scheduler", "cosine"),
                     warmup_steps=SFT_DEFAULTS.get("warmup_steps", 3), logging_steps=1,
                     max_length=SFT_DEFAULTS["max_length"], seed=run["seed"], data_seed=run["seed"],
                     use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, gradient_checkpointing=False,
                     report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)


class _IndexCache:
    """One decomposition per setting: the first ID-LoRA run clusters, later ones read its index file."""

    def __init__(self, directory: str) -> None:
        self.directory, self.files = directory, {}

    def key(self, config) -> str:
        return json.dumps({"spec": config.decomposition_spec(), "targets": sorted(config.target_modules)},
                          sort_keys=True)

    def prepare(self, config) -> bool:
        path = self.files.get(self.key(config))
        if path:
            config.indices_path = path
        return path is None  # True: this run clusters

    def store(self, config, model) -> None:
        from idlora_trl import get_indices, save_indices

        key = self.key(config)
        if key not in self.files:
            path = os.path.join(self.directory, f"indices-{len(self.files)}.safetensors")
            save_indices(path, get_indices(model), config.decomposition_spec())
            self.files[key] = path


def _one_run(run: dict, base, tokenizer, train, held_out, args, cache: _IndexCache, workdir: str) -> dict:
    from transformers import set_seed
    from trl import SFTTrainer

    from idlora_trl import IDLoRASFTTrainer
    from idlora_trl.evaluation import evaluate_accuracy

    p, targets = args.quality_p, _targets()
    config = _peft_config(run, p, targets)
    clusters = run["method"] == "ID-LoRA" and cache.prepare(config)
    set_seed(run["seed"])  # the adapter is initialised when the trainer is built
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        start = time.perf_counter()
        cls = IDLoRASFTTrainer if run["method"] == "ID-LoRA" else SFTTrainer
        trainer = cls(model=copy.deepcopy(base), args=_sft_config(args, run, workdir), train_dataset=train,
                      processing_class=tokenizer, peft_config=config)
        setup_s = time.perf_counter() - start
        if run["method"] == "ID-LoRA":
            cache.store(config, trainer.model)
        start = time.perf_counter()
        result = trainer.train()
        train_s = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    start = time.perf_counter()
    scores = evaluate_accuracy(trainer.model, tokenizer, held_out, batch_size=32)
    eval_s = time.perf_counter() - start
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    out = dict(run, trainable=trainable, setup_s=setup_s, clustered=clusters, train_s=train_s, eval_s=eval_s,
               train_loss=result.training_loss, losses=losses,
               accuracy={t: [s.correct, s.total] for t, s in scores.items()})
    log(f"quality: {run['group']} {run['label']} seed {run['seed']} lr {run['lr']:g}: mean acc {_mean_acc(out):.3f}, "
        f"train {train_s:.0f} s, eval {eval_s:.0f} s")
    del trainer
    gc.collect()
    return out


def _mean_acc(run: dict) -> float:
    accs = [c / t for c, t in run["accuracy"].values()]
    return sum(accs) / len(accs)


def _tail_loss(run: dict) -> float:
    losses = run["losses"]
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail)


def _parse_sweep(spec: str) -> dict[str, list[float]]:
    out = {}
    for part in spec.split(";"):
        if part.strip():
            method, values = part.split("=", 1)
            out[method.strip()] = [float(v) for v in values.split(",")]
    return out


def run(args, partial=None) -> dict:
    from idlora_trl.data import sft_dataset

    if args.smoke:
        train_rows = sft_dataset("train").select(range(24))
        held_out = sft_dataset("test", per_task=2).to_list()
        texts = [m["content"] for row in train_rows.to_list() + held_out for m in row["prompt"] + row["completion"]]
        tokenizer = tiny_tokenizer(texts)
        base = tiny_llama(vocab=len(tokenizer), hidden=64, layers=2, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        label = "tiny Llama (smoke)"
        args.seeds, args.quality_steps, args.quality_batch, args.quality_p = 1, 2, 4, 2
    else:
        from idlora_trl.smollm2 import load_smollm2

        base, tokenizer = load_smollm2()
        train_rows = sft_dataset("train")
        held_out = sft_dataset("test", per_task=args.eval_per_task).to_list()
        label = "SmolLM2-135M-Instruct"
    train = train_rows.select_columns(["prompt", "completion"])
    min_d_out = _min_d_out(base, _targets())
    data = {"model": label, "targets": _targets(), "p": args.quality_p,
            "steps": args.quality_steps, "batch": args.quality_batch, "max_length": SFT_DEFAULTS["max_length"],
            "scheduler": SFT_DEFAULTS.get("lr_scheduler", "cosine"), "warmup": SFT_DEFAULTS.get("warmup_steps", 3),
            "train_rows": len(train), "held_out": len(held_out), "min_d_out": min_d_out, "seeds": args.seeds,
            "ablation_seeds": args.ablation_seeds, "lr_idlora": args.lr_idlora, "lr_lora": args.lr_lora,
            "lr_source": "stated", "runs": [], "sweep": []}
    from idlora_trl.evaluation import evaluate_accuracy

    start = time.perf_counter()
    base_scores = evaluate_accuracy(base, tokenizer, held_out, batch_size=32)
    data["base"] = {"accuracy": {t: [s.correct, s.total] for t, s in base_scores.items()},
                    "eval_s": time.perf_counter() - start}
    with tempfile.TemporaryDirectory(prefix="idlora-bench-") as workdir:
        cache = _IndexCache(workdir)
        if args.lr_sweep:
            best = {}
            for method, lrs in _parse_sweep(args.lr_sweep).items():
                for lr in lrs:
                    sweep_run = dict(group="sweep", label=method, method=method, seed=0, lr=lr, settings={})
                    data["sweep"].append(_one_run(sweep_run, base, tokenizer, train, held_out, args, cache, workdir))
                    if partial:
                        partial(data)
                candidates = [r for r in data["sweep"] if r["method"] == method]
                best[method] = min(candidates, key=_tail_loss)["lr"]
            args.lr_lora = best.get("LoRA", args.lr_lora)
            args.lr_idlora = best.get("ID-LoRA", args.lr_idlora)
            data.update(lr_lora=args.lr_lora, lr_idlora=args.lr_idlora, lr_source="sweep",
                        lr_dora=best.get("DoRA", args.lr_lora))
        for spec in plan(args, min_d_out):
            if spec["method"] == "DoRA" and "lr_dora" in data:
                spec["lr"] = data["lr_dora"]
            data["runs"].append(_one_run(spec, base, tokenizer, train, held_out, args, cache, workdir))
            if partial:
                partial(data)
    return data


# -------------------------------------------------------------------------------------------- render
def _tasks(data: dict) -> list[str]:
    return list(data["base"]["accuracy"])


def _acc(run: dict, task: str) -> float:
    c, t = run["accuracy"][task]
    return c / t


def _cell(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f}" + (f" ± {spread(values):.3f}" if len(values) > 1 else "")


def _group(data: dict, label: str, group: str = "main") -> list[dict]:
    return [r for r in data["runs"] if r["group"] == group and r["label"] == label]


def _plot(data: dict, plot_dir) -> str | None:
    plt = pyplot()
    if plt is None or not data["runs"]:
        return None
    labels, means, errs = [], [], []
    for method in METHODS:
        runs = _group(data, method)
        if runs:
            accs = [_mean_acc(r) for r in runs]
            labels.append(f"{method} (n={len(runs)})")
            means.append(sum(accs) / len(accs))
            errs.append(spread(accs))
    abl = [r for r in data["runs"] if r["group"] == "ablation"]
    names = list(dict.fromkeys(r["label"] for r in abl))
    for name in names:
        accs = [_mean_acc(r) for r in abl if r["label"] == name]
        labels.append(name.replace(" (control for k=8)", " (control)"))
        means.append(sum(accs) / len(accs))
        errs.append(spread(accs))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(labels)), 3.8))
    colors = ["tab:blue", "tab:orange", "tab:green"][: len(labels) - len(names)] + ["tab:gray"] * len(names)
    ax.bar(range(len(labels)), means, yerr=errs, capsize=4, color=colors)
    base = data["base"]["accuracy"]
    base_mean = sum(c / t for c, t in base.values()) / len(base)
    ax.axhline(base_mean, color="black", lw=0.8, ls="--", label=f"base model {base_mean:.3f}")
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, min(1.0, max(means + [base_mean]) * 1.2) or 1.0)
    ax.set_ylabel("held-out accuracy (mean over tasks)")
    ax.set_title("Quality: main comparison (mean ± sd over seeds), ID-LoRA ablations (gray)", fontsize=9)
    ax.legend(fontsize=7)
    return save_plot(fig, plot_dir, "quality.png")


def render(data: dict, ctx) -> tuple[str, list]:
    tasks = _tasks(data)
    p = data["p"]
    lrs = (f"learning rates {'chosen by the sweep below' if data['lr_source'] == 'sweep' else 'stated, not swept'}: "
           f"LoRA {data['lr_lora']:g}, DoRA {data.get('lr_dora', data['lr_lora']):g} (lora_alpha = 2p), "
           f"ID-LoRA {data['lr_idlora']:g}" + (" (the CLI's default)" if data["lr_idlora"] == SFT_DEFAULTS["learning_rate"]
                                               else ""))
    out = [f"{data['model']}, fp32; targets {', '.join(data['targets'])} (the CLI's default: o_proj and "
           f"down_proj are left out on purpose, see `idlora_trl/cli/args.py`); {data['steps']} steps of batch "
           f"{data['batch']}, max length {data['max_length']}, {data['scheduler']} schedule with {data['warmup']} "
           f"warm-up steps, AdamW; {lrs}. Training rows: {data['train_rows']} (built-in mix, seed 0); held-out: "
           f"{data['held_out']} items, scored by exact match. Mean = the unweighted mean of the per-task "
           "accuracies; ± = sample standard deviation over seeds.", ""]
    if data.get("partial"):
        out += ["**Partial results: the run stopped before its last run.**", ""]
    base = data["base"]["accuracy"]
    rows = [["base model (no training)", "-", "-", *(f"{c / t:.3f}" for c, t in base.values()),
             f"{sum(c / t for c, t in base.values()) / len(base):.3f}", "-"]]
    lora_params = next((r["trainable"] for r in data["runs"] if r["method"] == "LoRA"), None)
    for method in METHODS:
        runs = _group(data, method)
        if not runs:
            continue
        share = f" ({runs[0]['trainable'] / lora_params:.0%} of LoRA)" if lora_params else ""
        rank = 4 * p if method == "ID-LoRA" else p
        rows.append([f"{method} r={rank}", f"{runs[0]['trainable']:,}{share}", f"{runs[0]['lr']:g}",
                     *(_cell([_acc(r, t) for r in runs]) for t in tasks), _cell([_mean_acc(r) for r in runs]),
                     len(runs)])
    out += [table(["method", "trainable", "lr", *tasks, "mean", "seeds"], rows), ""]
    plot = _plot(data, ctx.plot_dir)
    if plot:
        out += [f"![quality]({ctx.plot_rel}/{plot})", ""]

    default = _group(data, "ID-LoRA")
    default_by_seed = {r["seed"]: _mean_acc(r) for r in default}
    seed_sd = spread(list(default_by_seed.values()))
    abl = [r for r in data["runs"] if r["group"] == "ablation"]
    deltas = {}
    if abl and default:
        arow = [[f"default (pmrc, token router, rank_boost=2, k=4, r={4 * p})", f"{default[0]['trainable']:,}",
                 *(_cell([_acc(r, t) for r in default if r["seed"] < data["ablation_seeds"]]) for t in tasks),
                 _cell([default_by_seed[s] for s in sorted(default_by_seed) if s < data["ablation_seeds"]]), "-",
                 _fmt_setup(default[0])]]
        for name in dict.fromkeys(r["label"] for r in abl):
            runs = [r for r in abl if r["label"] == name]
            delta = [_mean_acc(r) - default_by_seed[r["seed"]] for r in runs if r["seed"] in default_by_seed]
            deltas[name] = sum(delta) / len(delta) if delta else float("nan")
            arow.append([name, f"{runs[0]['trainable']:,}", *(_cell([_acc(r, t) for r in runs]) for t in tasks),
                         _cell([_mean_acc(r) for r in runs]), f"{deltas[name]:+.3f}", _fmt_setup(runs[0])])
        out += [f"**ID-LoRA ablations** ({data['ablation_seeds']} seed(s); each changes one setting of the "
                "default; Δ = mean accuracy minus the default's on the same seed(s))", "",
                table(["variant", "trainable", *tasks, "mean", "Δ mean", "set-up (clustering), s"], arow,
                      "l" + "r" * (len(tasks) + 4)), ""]
    if data["sweep"]:
        out += ["**Learning-rate sweep** (seed 0; each method's lr is the one with the lowest mean training loss "
                "over the last quarter of the steps: batches it had not seen, since a run covers less than one "
                "epoch; held-out accuracy shown for information, not used to choose)", "",
                table(["method", "lr", "loss, last quarter", "mean held-out accuracy", "chosen"], align="lrrrl", rows=
                      [[r["method"], f"{r['lr']:g}", f"{_tail_loss(r):.4f}", f"{_mean_acc(r):.3f}",
                        "yes" if r["lr"] == data.get(f"lr_{r['method'].lower().replace('-', '')}",
                                                     data["lr_lora"]) else ""] for r in data["sweep"]]), ""]
    out += _answers(data, deltas, seed_sd, ctx)
    out += ["**Every run**", "", table(
        ["group", "run", "seed", "lr", *tasks, "mean", "loss first → last", "train, s", "eval, s"], align="ll" + "r" * (
            6 + len(tasks)), rows=
        [[r["group"], r["label"], r["seed"], f"{r['lr']:g}", *(f"{_acc(r, t):.3f}" for t in tasks),
          f"{_mean_acc(r):.3f}", f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f}" if r["losses"] else "-",
          f"{r['train_s']:.0f}", f"{r['eval_s']:.0f}"] for r in data["sweep"] + data["runs"]]), ""]
    return "\n".join(out), []


def _fmt_setup(run: dict) -> str:
    if run["method"] != "ID-LoRA":
        return f"{run['setup_s']:.1f}"
    if run["settings"].get("selection", "pmrc") != "pmrc":
        how = "no clustering"
    else:
        how = "clustered" if run.get("clustered") else "indices reused"
    return f"{run['setup_s']:.1f} ({how})"


def _verdict(delta: float, sd: float, n_seeds: int) -> str:
    if n_seeds < 2 or sd == 0:
        return f"Δ = {delta:+.3f} (one seed of the default: no spread to compare with)"
    if abs(delta) <= 2 * sd:
        return f"Δ = {delta:+.3f}, within twice the default's seed spread ({sd:.3f}): no clear difference"
    return f"Δ = {delta:+.3f}, more than twice the default's seed spread ({sd:.3f})"


def _answers(data: dict, deltas: dict, sd: float, ctx) -> list[str]:
    n = len(_group(data, "ID-LoRA"))
    out = ["**The reviewers' questions, answered with these numbers**", ""]
    runs = data["sweep"] + data["runs"]
    clustered = [r for r in runs if r.get("clustered") and r["settings"].get("selection", "pmrc") == "pmrc"]
    # set-up without clustering: ID-LoRA runs that reused indices, else LoRA's (trainer and data set-up alone)
    plain = [r for r in runs if r["method"] == "ID-LoRA" and not r.get("clustered")
             and r["settings"].get("selection", "pmrc") == "pmrc"] or [r for r in runs if r["method"] == "LoRA"]
    train_s = median(r["train_s"] for r in data["runs"]) if data["runs"] else float("nan")
    clustering = ctx.clustering_summary()
    if clustered and plain:
        cost = clustered[0]["setup_s"] - median(r["setup_s"] for r in plain)
        out.append(f"- *Clustering cost*: PMRC of the {len(data['targets'])} targeted projections of every decoder "
                   f"layer added {cost:.1f} s to the first ID-LoRA run's set-up (against runs that needed no "
                   f"clustering), next to a median of {train_s:.0f} s of training per run "
                   f"({100 * cost / train_s:.0f}%); it runs once per setting and is saved with the adapter. "
                   f"{clustering}")
    else:
        out.append(f"- *Clustering cost*: {clustering or 'not measured in this run'}")
    k_lines = [f"{name}: {_verdict(d, sd, n)}" for name, d in deltas.items() if name.startswith("k=")]
    if k_lines:
        out.append("- *Sensitivity to k* (against k=4): " + "; ".join(k_lines) + ".")
    for key, question in (("router=static", "Does a static router do as well as the token router?"),
                          ("selection=random", "Does PMRC beat random rows?"),
                          ("selection=sequential", "Does PMRC beat sequential rows?"),
                          ("rank_boost=1", "Rank boosting (f=2 against f=1)")):
        if key in deltas:
            sign = {"router=static": "static minus token", "selection=random": "random minus PMRC",
                    "selection=sequential": "sequential minus PMRC", "rank_boost=1": "f=1 minus f=2"}[key]
            out.append(f"- *{question}* ({sign}) {_verdict(deltas[key], sd, n)}.")
    if not deltas:
        out.append("- Ablations: not run.")
    out.append("")
    return out
