"""Skeleton-row selection for ID-LoRA (method doc §1, the paper's "PMRC").

The rows of a frozen weight ``W`` (``[d_out, d_in]``) are treated as ``d_out`` points in ``R^{d_in}``.
:func:`select_rows` returns a ``[k, r]`` int64 tensor of row indices: ``r`` rows per cluster, which the
adapter gathers from the frozen layer's output. Everything here is pure torch and runs once, before training.

:func:`constrained_kmeans` is k-means in which every cluster keeps at least ``min_size`` points:

* init: greedy k-means++ (``2 + ln k`` D^2-sampled candidates per centre, keep the one with the lowest
  *constrained* assignment cost), drawn from a local CPU ``torch.Generator``, so the result depends only
  on the data and the seed, never on the global RNG or the device;
* assignment: for fixed centroids, the optimal assignment under the size constraint is a transportation
  problem with ``k`` sinks, solved exactly by cluster prices (its LP dual) and, when prices ping-pong,
  successive shortest paths (``assignment.py``);
* update: centroids are the means of their points (a one-hot matmul: deterministic on CUDA too);
  stop when the assignment no longer changes, when the centroids move by at most ``tol`` times the mean
  feature variance (the reference's criterion) or after ``max_iter`` rounds; keep the best of ``n_init``.
  The ``n_init`` restarts run together: their seeding candidates are scored in one batched assignment per
  centre, and each Lloyd round is one distance matmul, one batched assignment and one means matmul for all
  restarts still moving.

All arithmetic is float32 on the input's device, except the shortest-path repair (float64 on the CPU, it
only sees the ``[n, k]`` distances); inertias are accumulated in float64.
"""
from __future__ import annotations

import math
from numbers import Integral

from typing import Literal, get_args

import torch

from .assignment import assign

__all__ = ["SELECTIONS", "CLUSTERED", "DISTANCES", "constrained_kmeans", "pivoted_rows", "select_rows"]

# The one definition of each choice of the decomposition (config, CLI and Axolotl read these).
Selection = Literal["pmrc", "pmrc-qr", "random", "sequential"]  # built-in strategies; plugins may add more
SELECTIONS: tuple[str, ...] = get_args(Selection)
CLUSTERED = ("pmrc", "pmrc-qr")  # the selections that run the size-constrained k-means
Distance = Literal["euclidean", "cosine"]
DISTANCES: tuple[str, ...] = get_args(Distance)


# --------------------------------------------------------------------------------------------- helpers
def _sq_dists(points: torch.Tensor, sq_norms: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[n, k]`` as ``||x||^2 - 2 x.c + ||c||^2`` (one matmul), clamped at 0."""
    d = torch.addmm(centroids.pow(2).sum(1).unsqueeze(0), points, centroids.T, alpha=-2.0)
    return d.add_(sq_norms.unsqueeze(1)).clamp_(min=0.0)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t`` (one min/max pass: both propagate NaN; ``isfinite(t).all()`` is ~20x slower)."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _own_sq_dists(points: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor,
                  chunk: int = 4096) -> torch.Tensor:
    """Exact ``||x_i - c_{labels_i}||^2`` per point (direct differences, in row chunks to bound memory)."""
    return torch.cat([(points[s:s + chunk] - centroids[labels[s:s + chunk]]).pow(2).sum(1)
                      for s in range(0, points.shape[0], chunk)])


def _kmeans_pp(points: torch.Tensor, sq_norms: torch.Tensor, k: int, min_size: int, gen: torch.Generator,
               n_init: int) -> torch.Tensor:
    """Greedy k-means++ seeding of ``n_init`` restarts at once (``[n_init, k, d]`` centres), made aware of the
    size constraint: each new centre is the best of a few D^2-sampled candidate rows, "best" meaning the lowest
    cost of the *constrained* assignment of all points to the centres so far. Without a binding constraint this
    is plain greedy k-means++; with one, it stops k-means++ from seeding isolated outlier rows that the
    constraint would then force to absorb ``min_size`` ordinary rows each (a poor local optimum that Lloyd
    iterations cannot leave). The restarts' candidates are scored together: one distance matmul per centre and
    a few batched assignments (:func:`_best_candidates`). Twice scikit-learn's ``2 + ln k`` candidates: with a
    binding constraint the greedy choice among more candidates escapes outlier seeds more often (a test case of
    one large blob and three tiny ones: 39% of restarts reach the best optimum against 16%)."""
    n, runs = points.shape[0], torch.arange(n_init)
    trials = 2 * (2 + int(math.log(k)))
    chosen = [torch.randint(n, (n_init,), generator=gen)]
    dist = _sq_dists(points, sq_norms, points[chosen[0].to(points.device)]).T.unsqueeze(2)  # [runs, n, centres]
    closest = dist[:, :, 0]
    for _ in range(1, k):
        weights = closest.double().cpu()  # sampling on the CPU keeps the draw device-independent
        total = weights.sum(1, keepdim=True)
        u = torch.rand(n_init, trials, generator=gen, dtype=torch.float64) * total
        cand = torch.searchsorted(weights.cumsum(1), u, right=True).clamp_(max=n - 1)  # [runs, trials]
        flat = (total <= 0).squeeze(1)  # fewer distinct points than centres: any point will do
        if bool(flat.any()):
            cand[flat] = torch.randint(n, (int(flat.sum()), trials), generator=gen)
        cand_dist = _sq_dists(points, sq_norms, points[cand.flatten().to(points.device)])
        cand_dist = cand_dist.T.reshape(n_init, trials, n)
        options = torch.cat([dist.unsqueeze(1).expand(-1, trials, -1, -1), cand_dist.unsqueeze(3)], 3)
        best = _best_candidates(options, min_size).cpu()  # [runs]
        chosen.append(cand[runs, best])
        picked = cand_dist[runs.to(points.device), best.to(points.device)]  # [runs, n]
        dist = torch.cat([dist, picked.unsqueeze(2)], 2)
        closest = torch.minimum(closest, picked)
    return points[torch.stack(chosen, 1).to(points.device)]


def _best_candidates(options: torch.Tensor, min_size: int) -> torch.Tensor:
    """Each run's candidate (``options``: ``[runs, trials, n, centres]`` costs) with the lowest constrained
    assignment cost, ties to the first, scoring as few candidates as possible: the unconstrained cost (every
    point at its nearest centre) is a lower bound of the constrained one, equal to it when that assignment is
    feasible. First each run's candidate of lowest bound is scored (one batched assignment), then, in a second
    batch, every other candidate whose bound does not exceed its run's best cost. Same choice as scoring every
    candidate."""
    runs, trials = options.shape[:2]
    bound = options.amin(3).sum(2, dtype=torch.float64)  # [runs, trials]
    first = bound.argmin(1)  # ties: the first candidate
    every = torch.arange(runs, device=options.device)
    problems = options[every, first]
    best_cost = problems.gather(2, assign(problems, min_size).unsqueeze(2)).squeeze(2).sum(1, dtype=torch.float64)
    index = torch.arange(trials, device=options.device).expand(runs, -1)
    # a candidate can still win: its bound is below the best cost, or equal to it with a lower index
    open_ = (bound < best_cost.unsqueeze(1)) | ((bound == best_cost.unsqueeze(1)) & (index < first.unsqueeze(1)))
    open_[every, first] = False
    run, cand = open_.nonzero(as_tuple=True)
    if not len(run):
        return first
    problems = options[run, cand]
    cost = problems.gather(2, assign(problems, min_size).unsqueeze(2)).squeeze(2).sum(1, dtype=torch.float64)
    costs = torch.full((runs, trials), math.inf, dtype=torch.float64, device=options.device)
    costs[every, first] = best_cost
    costs[run, cand] = cost
    return costs.argmin(1)  # unscored candidates cannot win (their cost >= bound > best); ties: the first


# ----------------------------------------------------------------------------------------------- k-means
def constrained_kmeans(points: torch.Tensor, k: int, min_size: int, *, seed: int = 0, n_init: int = 10,
                       max_iter: int = 100, tol: float = 1e-4) -> tuple[torch.LongTensor, torch.Tensor, float]:
    """k-means with every cluster holding at least `min_size` points. Returns (labels [n], centroids [k, d], inertia).

    ``labels`` (int64) and ``centroids`` (float32, the means of their clusters) are on ``points``' device;
    ``inertia`` is the sum of squared distances of the points to their centroids, lowest of ``n_init`` runs.
    A run stops when its assignment no longer changes, when its centroids move by at most ``tol`` times the
    mean per-feature variance of the points (summed squared shift: scikit-learn's and k-means-constrained's
    criterion, with their default ``tol``), or after ``max_iter`` rounds.
    """
    if points.dim() != 2:
        raise ValueError(f"points must be a 2-D [n, d] tensor, got shape {tuple(points.shape)}.")
    n = points.shape[0]
    for name, value, low in (("k", k, 1), ("min_size", min_size, 0), ("n_init", n_init, 1),
                             ("max_iter", max_iter, 1)):
        if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}.")
    if k > n or k * min_size > n:
        raise ValueError(f"cannot make k={k} clusters of at least min_size={min_size} points from n={n} "
                         "points; lower k or min_size.")
    x = points.detach().to(torch.float32)
    if not _all_finite(x):
        raise ValueError("points contain NaN or Inf values; clean the input before clustering.")
    sq_norms = x.pow(2).sum(1)
    gen = torch.Generator().manual_seed(int(seed))
    starts = _kmeans_pp(x, sq_norms, k, min_size, gen, n_init)
    # mean per-feature variance = (mean ||x||^2 - ||mean x||^2) / d
    mean_var = (float(sq_norms.sum(dtype=torch.float64)) / n - float(x.mean(0).double().pow(2).sum())) / x.shape[1]
    shift_tol = tol * max(mean_var, 0.0)
    labels, centroids = _lloyd(x, sq_norms, starts, min_size, max_iter, shift_tol)
    # Every centroid is the mean of its points, so a restart's inertia is sum ||x||^2 - sum_c n_c ||c||^2:
    # the restarts are ranked without a pass over the points, and only the winner's is computed directly.
    total = float(sq_norms.sum(dtype=torch.float64))
    sizes = torch.stack([torch.bincount(lab, minlength=k) for lab in labels]).double()
    ranked = total - (sizes * centroids.double().pow(2).sum(2)).sum(1)
    best = int(ranked.argmin())  # ties: the first restart
    inertia = float(_own_sq_dists(x, centroids[best], labels[best]).sum(dtype=torch.float64))
    return labels[best], centroids[best], inertia


def _lloyd(x: torch.Tensor, sq_norms: torch.Tensor, starts: torch.Tensor, min_size: int, max_iter: int,
           shift_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations (constrained assignment, then means) of all restarts at once: one distance matmul and
    one batched assignment per round for every restart still moving. The means come from per-cluster sums
    (float64): one one-hot matmul in the first round, then only the points that changed cluster are added
    and removed. A restart stops when its assignment no longer changes or its centroids move by at most
    ``shift_tol`` (or after ``max_iter`` rounds) and is left as it is: every restart runs exactly the
    iterations it would run alone. Returns ``labels [runs, n]`` and ``centroids [runs, k, d]``, each centroid
    the mean of its points."""
    n, (runs, k, d) = x.shape[0], starts.shape
    centroids = starts.clone()
    labels = torch.full((runs, n), -1, dtype=torch.long, device=x.device)
    sums = torch.zeros(runs * k, d, dtype=torch.float64, device=x.device)  # row j * k + c: cluster c of run j
    sizes = torch.zeros(runs * k, dtype=torch.float64, device=x.device)
    moving = torch.arange(runs, device=x.device)
    for step in range(max_iter):
        m = len(moving)
        dist = _sq_dists(x, sq_norms, centroids[moving].reshape(m * k, d))  # [n, m * k]
        new = assign(dist.view(n, m, k).transpose(0, 1).contiguous(), min_size)  # [m, n]; contiguous: fast argmin
        old_labels = labels[moving]
        changed = (new != old_labels).any(1)
        labels[moving] = new
        moving, new, old_labels = moving[changed], new[changed], old_labels[changed]
        if not len(moving):
            break
        m, slots = len(moving), k * moving.unsqueeze(1)
        if step == 0:  # every run: sums from scratch
            onehot = x.new_zeros(n, m * k)
            onehot.scatter_(1, (new + k * torch.arange(m, device=x.device).unsqueeze(1)).T, 1.0)
            sums[:] = (onehot.T @ x).double()
            sizes[:] = onehot.sum(0).double()
        else:  # only the points that moved
            run, point = (new != old_labels).nonzero(as_tuple=True)
            moved = x[point].double()
            for rows, sign in (((slots + new)[run, point], 1.0), ((slots + old_labels)[run, point], -1.0)):
                sums.index_add_(0, rows, moved, alpha=sign)
                sizes.index_add_(0, rows, torch.full_like(rows, sign, dtype=torch.float64))
        cluster = (slots + torch.arange(k, device=x.device)).flatten()
        count = sizes[cluster].view(m, k, 1)
        old = centroids[moving]
        # an empty cluster (only when min_size == 0) keeps its old centroid
        updated = torch.where(count > 0, (sums[cluster].view(m, k, d) / count.clamp(min=1.0)).float(), old)
        centroids[moving] = updated
        moving = moving[(updated - old).pow(2).sum((1, 2)) > shift_tol]
        if not len(moving):
            break
    return labels, centroids


# -------------------------------------------------------------------------------------------- selection
def pivoted_rows(rows: torch.Tensor, r: int) -> torch.LongTensor:
    """The first ``r`` pivots of a column-pivoted QR of ``rows.T``: greedily, the row with the largest component
    orthogonal to the rows already picked (ties: the lower index). Modified Gram-Schmidt on a copy."""
    residual = rows.clone()
    norms = residual.pow(2).sum(1)
    picked: list[int] = []
    for _ in range(r):
        j = int(torch.argmax(norms))  # argmax returns the first of equal values
        picked.append(j)
        q = residual[j] / norms[j].sqrt().clamp(min=torch.finfo(rows.dtype).tiny)
        residual -= torch.outer(residual @ q, q)
        norms = residual.pow(2).sum(1)
        norms[picked] = -1.0  # never picked twice (even when the rows are rank-deficient)
    return torch.tensor(picked, dtype=torch.long, device=rows.device)


def _check_select_args(weight, k, r, selection, distance, min_size) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D [d_out, d_in] tensor (an nn.Linear.weight), got {shape}.")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection={selection!r}; use one of {SELECTIONS}.")
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance={distance!r}; use one of {DISTANCES}.")
    for name, value in (("num_clusters", k), ("r", r), ("min_cluster_size", min_size)):
        if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    d_out = weight.shape[0]
    if k * r > d_out:
        raise ValueError(f"num_clusters * r = {k} * {r} = {k * r} exceeds d_out = {d_out} rows; "
                         "lower num_clusters or r.")
    if min_size < r:
        raise ValueError(f"min_cluster_size={min_size} is below r={r}: every cluster must hold at least r "
                         "rows; raise min_cluster_size or leave it as None (defaults to r).")
    if k * min_size > d_out:
        raise ValueError(f"num_clusters * min_cluster_size = {k} * {min_size} = {k * min_size} exceeds "
                         f"d_out = {d_out} rows; lower min_cluster_size or num_clusters.")
    if not _all_finite(weight.detach()):
        raise ValueError("weight contains NaN or Inf values; select rows from a finite (pretrained) weight.")


def select_rows(weight: torch.Tensor, *, num_clusters: int, r: int, selection: str = "pmrc",
                distance: str = "euclidean", min_cluster_size: int | None = None, seed: int = 0) -> torch.LongTensor:
    """Row indices [num_clusters, r] (int64, on CPU) of the skeleton rows of `weight` ([d_out, d_in], rows are points).

    * ``"pmrc"`` (paper): constrained k-means of the rows (min size ``min_cluster_size``, default ``r``);
      in each cluster the ``r`` rows nearest its centroid, by ascending distance (ties: lower row index).
    * ``"pmrc-qr"`` (choice, beyond the paper): the same clusters; in each, the ``r`` rows a column-pivoted QR
      of the cluster's rows picks (:func:`pivoted_rows`), in the order picked: rows that span the cluster well,
      as in the interpolative decomposition (Cheng et al. 2005), instead of the nearly parallel rows
      nearest the centroid.
    * ``"random"``: ``k r`` distinct rows drawn with a generator seeded by ``seed``, in ``k`` groups of ``r``.
    * ``"sequential"``: block ``i`` of ``tensor_split(arange(d_out), k)`` contributes its first ``r`` rows.

    ``distance="cosine"`` clusters the L2-normalised rows (zero rows stay zero) with the same algorithm;
    it only affects ``"pmrc"``. Every group is ordered as described; the groups are then ordered by their
    smallest row index, so the output does not depend on how clusters happened to be numbered.
    """
    k = num_clusters
    min_size = r if min_cluster_size is None else min_cluster_size
    _check_select_args(weight, k, r, selection, distance, min_size)
    d_out = weight.shape[0]
    if selection == "random":
        gen = torch.Generator().manual_seed(int(seed))
        groups = torch.randperm(d_out, generator=gen)[: k * r].view(k, r).sort(dim=1).values
    elif selection == "sequential":
        groups = torch.stack([block[:r] for block in torch.tensor_split(torch.arange(d_out), k)])
    else:
        x = weight.detach().to(torch.float32)
        if distance == "cosine":
            x = torch.nn.functional.normalize(x, dim=1)
        labels, centroids, _ = constrained_kmeans(x, k, min_size, seed=seed)
        own = _own_sq_dists(x, centroids, labels)
        picked = []
        for c in range(k):
            members = (labels == c).nonzero().squeeze(1)  # ascending row index, so a stable sort breaks ties
            if selection == "pmrc-qr":
                picked.append(members[pivoted_rows(weight.detach()[members].to(torch.float64), r)])
            else:
                picked.append(members[torch.sort(own[members], stable=True).indices[:r]])
        groups = torch.stack(picked).cpu()
    groups = groups.to(torch.int64)
    return groups[groups.min(1).values.argsort()].contiguous()
