"""Part of section 2: where our clustering time goes (k-means++ seeding, distances, the constrained assignment,
centroid means), from one instrumented `select_rows` run per matrix (its table: `report.render_profile`).
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import timed


# ------------------------------------------------------------------------------------------- profiling
def profile_kmeans(w: torch.Tensor, k: int, r: int, seed: int) -> dict:
    """Where `select_rows` spends its time: k-means++ seeding, Lloyd assignment (distance matmul + the
    constrained assignment), centroid updates, per-restart inertia, and the final row picking. Wraps the
    module's private helpers for one run (no change to the library); times are inclusive of what they call."""
    from idlora_trl import assignment
    from idlora_trl import decomposition as dec

    names = ("_kmeans_pp", "_sq_dists", "assign", "_lloyd", "_own_sq_dists")
    originals = {n: getattr(dec, n) for n in names}
    original_repair = assignment.shortest_path_repair
    acc = {"init": 0.0, "distances": 0.0, "assignment": 0.0, "lloyd": 0.0, "inertia": 0.0, "repairs": 0,
           "lloyd_iterations": 0, "constrained_assignments": 0}
    state = {"in_init": False}

    def wrap(name, key):
        fn = originals[name]

        def inner(*a, **kw):
            if state["in_init"] and name != "_kmeans_pp":
                return fn(*a, **kw)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            acc[key] += time.perf_counter() - t0
            return out
        return inner

    def init(*a, **kw):
        state["in_init"] = True
        t0 = time.perf_counter()
        try:
            return originals["_kmeans_pp"](*a, **kw)
        finally:
            acc["init"] += time.perf_counter() - t0
            state["in_init"] = False

    def assign(dist, min_size, *a, **kw):  # one call per Lloyd round: a batch of the restarts still moving
        if state["in_init"]:
            return originals["assign"](dist, min_size, *a, **kw)
        t0 = time.perf_counter()
        batch = dist if dist.dim() == 3 else dist.unsqueeze(0)
        acc["lloyd_iterations"] += batch.shape[0]
        counts = torch.nn.functional.one_hot(batch.argmin(2), batch.shape[2]).sum(1)
        acc["constrained_assignments"] += int((counts < min_size).any(1).sum())
        out = originals["assign"](dist, min_size, *a, **kw)
        acc["assignment"] += time.perf_counter() - t0
        return out

    def repair(*a, **kw):
        acc["repairs"] += not state["in_init"]
        return original_repair(*a, **kw)

    patched = {"_kmeans_pp": init, "_sq_dists": wrap("_sq_dists", "distances"), "assign": assign,
               "_lloyd": wrap("_lloyd", "lloyd"), "_own_sq_dists": wrap("_own_sq_dists", "inertia")}
    try:
        for n, fn in patched.items():
            setattr(dec, n, fn)
        assignment.shortest_path_repair = repair
        total = timed(lambda: dec.select_rows(w, num_clusters=k, r=r, seed=seed))
    finally:
        for n, fn in originals.items():
            setattr(dec, n, fn)
        assignment.shortest_path_repair = original_repair
    acc["total"] = total
    # Centroid updates and bookkeeping: the Lloyd loop's time outside the distance matmuls and assignments.
    acc["means"] = max(0.0, acc.pop("lloyd") - acc["distances"] - acc["assignment"])
    return acc
