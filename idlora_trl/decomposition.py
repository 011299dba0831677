"""Skeleton-row selection for ID-LoRA (method doc §1, the paper's "PMRC").

The rows of a frozen weight ``W`` (``[d_out, d_in]``) are treated as ``d_out`` points in ``R^{d_in}``.
:func:`select_rows` returns a ``[k, r]`` int64 tensor of row indices: ``r`` rows per cluster, which the
adapter gathers from the frozen layer's output. Everything here is pure torch and runs once, before training.

:func:`constrained_kmeans` is k-means in which every cluster keeps at least ``min_size`` points:

* init: greedy k-means++ (``2 + ln k`` D^2-sampled candidates per centre, keep the one with the lowest
  *constrained* assignment cost), drawn from a local CPU ``torch.Generator``, so the result depends only
  on the data and the seed, never on the global RNG or the device;
* assignment: for fixed centroids, the optimal assignment under the size constraint is a transportation
  problem with ``k`` sinks. It is solved by cluster *prices* ``lam`` (the LP dual): points take
  ``argmin_c D[x, c] - lam[c]``; while a cluster is short of points, its price is raised by the least
  amount that makes ``min_size`` points prefer it. Prices only rise and a priced cluster ends with exactly
  ``min_size`` points, so complementary slackness holds and the assignment is optimal. When the
  unconstrained assignment is already feasible (the common case) no price is ever raised. When several
  clusters compete for the same points, single-price raises can ping-pong; as soon as a raised cluster
  falls short again, successive shortest paths finish the job (one point per augmentation, still exact),
  so the constraint always holds;
* update: centroids are the means of their points (a one-hot matmul: deterministic on CUDA too);
  stop when the assignment no longer changes or after ``max_iter`` rounds; keep the best of ``n_init``.
  The ``n_init`` restarts are seeded one after another (same draws as alone), then iterated together, one
  distance matmul and one means matmul per round for all restarts still moving.

All arithmetic is float32 on the input's device, except the shortest-path repair (float64 on the CPU, it
only sees the ``[n, k]`` distances); inertias are accumulated in float64.
"""
from __future__ import annotations

import heapq
import math
from numbers import Integral

from typing import Literal, get_args

import torch

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


def _own_sq_dists(points: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor,
                  chunk: int = 4096) -> torch.Tensor:
    """Exact ``||x_i - c_{labels_i}||^2`` per point (direct differences, in row chunks to bound memory)."""
    return torch.cat([(points[s:s + chunk] - centroids[labels[s:s + chunk]]).pow(2).sum(1)
                      for s in range(0, points.shape[0], chunk)])


def _kmeans_pp(points: torch.Tensor, sq_norms: torch.Tensor, k: int, min_size: int,
               gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding made aware of the size constraint: each new centre is the best of a few
    D^2-sampled candidate rows, "best" meaning the lowest cost of the *constrained* assignment of all points
    to the centres so far. Without a binding constraint this is plain greedy k-means++; with one, it stops
    k-means++ from seeding isolated outlier rows that the constraint would then force to absorb
    ``min_size`` ordinary rows each (a poor local optimum that Lloyd iterations cannot leave)."""
    n = points.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    dist = _sq_dists(points, sq_norms, points[first:first + 1])  # [n, centres so far]
    chosen, closest = [first], dist[:, 0]
    for _ in range(1, k):
        weights = closest.double().cpu()  # sampling on the CPU keeps the draw device-independent
        total = float(weights.sum())
        if total > 0:
            u = torch.rand(trials, generator=gen, dtype=torch.float64) * total
            cand = torch.searchsorted(weights.cumsum(0), u, right=True).clamp_(max=n - 1)
        else:  # fewer distinct points than centres: any point will do
            cand = torch.randint(n, (trials,), generator=gen)
        cand_dist = _sq_dists(points, sq_norms, points[cand.to(points.device)])  # [n, trials]
        costs = []
        for t in range(trials):
            d = torch.cat([dist, cand_dist[:, t:t + 1]], 1)
            costs.append(float(d.gather(1, _assign(d, min_size).unsqueeze(1)).sum(dtype=torch.float64)))
        best = min(range(trials), key=costs.__getitem__)
        chosen.append(int(cand[best]))
        dist = torch.cat([dist, cand_dist[:, best:best + 1]], 1)
        closest = torch.minimum(closest, cand_dist[:, best])
    return points[chosen].clone()


# ------------------------------------------------------------------------------------------ assignment
def _assign(dist: torch.Tensor, min_size: int, max_rounds: int | None = None) -> torch.Tensor:
    """Optimal assignment of the ``n`` points to ``k`` clusters with costs ``dist`` ``[n, k]`` and every
    cluster holding at least ``min_size`` points: cluster prices (see the module docstring), then shortest
    paths for whatever the prices leave short. ``max_rounds`` caps the price rounds (default ``k``; tests
    use 0 to exercise the shortest paths alone)."""
    k = dist.shape[1]
    labels = dist.argmin(1)
    counts = torch.bincount(labels, minlength=k)
    if min_size == 0 or bool((counts >= min_size).all()):
        return labels  # unconstrained optimum is feasible, hence optimal
    lam = dist.new_zeros(k)
    raised: set[int] = set()
    for _ in range(k if max_rounds is None else max_rounds):
        c = int(counts.argmin())  # the most deficient cluster
        if c in raised:  # it lost points to a later raise; prices could ping-pong, let paths finish
            break
        raised.add(c)
        cost = dist - lam
        others = cost.clone()
        others[:, c] = math.inf
        margin = cost[:, c] - others.amin(1)  # how much cheaper c must get for x to prefer it
        # Pull in the (min_size - count) outsiders with the smallest margins (ties: lower row index) and
        # raise lam[c] by exactly the largest of those margins: every point stays at an argmin of
        # dist - lam, c ends with exactly min_size points and no other cluster gains any.
        outside = torch.where(labels == c, math.inf, margin)
        order = torch.sort(outside, stable=True).indices[: min_size - int(counts[c])]
        lam[c] += outside[order[-1]].clamp(min=0)
        labels = labels.clone()
        labels[order] = c
        counts = torch.bincount(labels, minlength=k)
        if bool((counts >= min_size).all()):
            return labels
    return _shortest_path_repair(dist, labels, min_size)


def _shortest_path_repair(dist: torch.Tensor, labels: torch.Tensor, min_size: int) -> torch.Tensor:
    """Successive shortest paths: move one point at a time along the cheapest chain of reassignments
    (i -> j -> ... -> c) from a cluster above ``min_size`` to a deficient cluster ``c``. Exact when
    ``labels`` is optimal for its own counts (true for any ``argmin(dist - lam)``) and clusters above
    ``min_size`` have zero price (true after the price rounds of :func:`_assign`).

    Runs in float64 on the CPU (``dist`` is only ``[n, k]``). The members of each cluster are ranked once
    by the cost of moving them to each other cluster, so an augmentation costs about O(k^3 + k^2 log n):
    Bellman-Ford over the k clusters (edge i -> j = cheapest move from i to j), one point moved per edge."""
    k = dist.shape[1]
    dd, lab_t = dist.double().cpu(), labels.cpu()
    d, lab = dd.tolist(), lab_t.tolist()
    tol = 1e-9 * float(dd.abs().max())  # ignore float32 round-off "improvements" (no spurious cycles)
    counts = torch.bincount(lab_t, minlength=k).tolist()
    # ranked[i][j]: the initial members of i by ascending cost of moving them to j (read with a pointer
    # that skips points gone from i); arrivals[i][j]: a heap of (cost, point) for points that joined i later.
    ranked = []
    for i in range(k):
        members = (lab_t == i).nonzero().squeeze(1)
        moves = dd[members] - dd[members, i:i + 1]
        ranked.append(members[moves.argsort(dim=0, stable=True)].T.tolist())
    ptr = [[0] * k for _ in range(k)]
    arrivals: list[list[list[tuple[float, int]]]] = [[[] for _ in range(k)] for _ in range(k)]

    def cheapest(i: int, j: int) -> tuple[float, int]:
        """(cost, point) of the cheapest move of a current member of i to j."""
        lst, p = ranked[i][j], ptr[i][j]
        while p < len(lst) and lab[lst[p]] != i:
            p += 1
        ptr[i][j] = p
        best = (d[lst[p]][j] - d[lst[p]][i], lst[p]) if p < len(lst) else (math.inf, -1)
        heap = arrivals[i][j]
        while heap and lab[heap[0][1]] != i:
            heapq.heappop(heap)
        return min(best, heap[0]) if heap else best

    while True:
        deficient = [c for c in range(k) if counts[c] < min_size]
        if not deficient:
            return torch.tensor(lab, dtype=torch.int64, device=labels.device)
        edge = [[cheapest(i, j)[0] if i != j else math.inf for j in range(k)] for i in range(k)]
        best = [0.0 if counts[c] > min_size else math.inf for c in range(k)]
        pred = [-1] * k
        for _ in range(k - 1):
            for i in range(k):
                for j in range(k):
                    if best[i] + edge[i][j] < best[j] - tol:
                        best[j], pred[j] = best[i] + edge[i][j], i
        j, path = min(deficient, key=best.__getitem__), []
        while pred[j] != -1 and len(path) < k:
            path.append((pred[j], j))
            j = pred[j]
        if not path or counts[j] <= min_size:  # cannot happen while k * min_size <= n
            raise RuntimeError("constrained assignment: no augmenting path from a cluster with spare points")
        moves = [(cheapest(i, j)[1], i, j) for i, j in path]  # distinct clusters, hence distinct points
        for x, i, j in moves:
            lab[x] = j
            counts[i] -= 1
            counts[j] += 1
            for t in range(k):
                if t != j:
                    heapq.heappush(arrivals[j][t], (d[x][t] - d[x][j], x))


# ----------------------------------------------------------------------------------------------- k-means
def constrained_kmeans(points: torch.Tensor, k: int, min_size: int, *, seed: int = 0, n_init: int = 10,
                       max_iter: int = 100) -> tuple[torch.LongTensor, torch.Tensor, float]:
    """k-means with every cluster holding at least `min_size` points. Returns (labels [n], centroids [k, d], inertia).

    ``labels`` (int64) and ``centroids`` (float32, the means of their clusters) are on ``points``' device;
    ``inertia`` is the sum of squared distances of the points to their centroids, lowest of ``n_init`` runs.
    """
    if points.dim() != 2:
        raise ValueError(f"points must be a 2-D [n, d] tensor, got shape {tuple(points.shape)}.")
    n = points.shape[0]
    for name, value, low in (("k", k, 1), ("min_size", min_size, 0), ("n_init", n_init, 1),
                             ("max_iter", max_iter, 1)):
        if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if k > n or k * min_size > n:
        raise ValueError(f"cannot make k={k} clusters of at least min_size={min_size} points from n={n} "
                         "points; lower k or min_size.")
    x = points.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("points contain NaN or Inf values; clean the input before clustering.")
    sq_norms = x.pow(2).sum(1)
    gen = torch.Generator().manual_seed(int(seed))
    starts = [_kmeans_pp(x, sq_norms, k, min_size, gen) for _ in range(n_init)]  # the draws in restart order
    labels, centroids = _lloyd(x, sq_norms, starts, min_size, max_iter)
    # Every centroid is the mean of its points, so a restart's inertia is sum ||x||^2 - sum_c n_c ||c||^2:
    # the restarts are ranked without a pass over the points, and only the winner's is computed directly.
    total = float(sq_norms.sum(dtype=torch.float64))
    ranked = [total - float((torch.bincount(lab, minlength=k).double() * cen.double().pow(2).sum(1)).sum())
              for lab, cen in zip(labels, centroids)]
    best = min(range(n_init), key=ranked.__getitem__)
    inertia = float(_own_sq_dists(x, centroids[best], labels[best]).sum(dtype=torch.float64))
    return labels[best], centroids[best], inertia


def _lloyd(x: torch.Tensor, sq_norms: torch.Tensor, starts: list[torch.Tensor], min_size: int,
           max_iter: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Lloyd iterations (constrained assignment, then means) of all restarts at once: one distance matmul
    and one one-hot means matmul per round for every restart still moving, instead of one per restart. Each
    restart stops when its assignment no longer changes (or after ``max_iter`` rounds) and is left as it is;
    every restart runs exactly the iterations it would run alone."""
    n, k = x.shape[0], starts[0].shape[0]
    centroids, labels = list(starts), [None] * len(starts)
    moving = list(range(len(starts)))
    rows = torch.arange(n, device=x.device)
    for _ in range(max_iter):
        dist = _sq_dists(x, sq_norms, torch.cat([centroids[i] for i in moving]))  # [n, len(moving) * k]
        still = []
        for j, i in enumerate(moving):
            new = _assign(dist[:, j * k:(j + 1) * k].contiguous(), min_size)
            if labels[i] is None or not torch.equal(new, labels[i]):
                labels[i] = new
                still.append(i)
        moving = still
        if not moving:
            break
        onehot = x.new_zeros(n, len(moving) * k)
        for j, i in enumerate(moving):
            onehot[rows, labels[i] + j * k] = 1.0
        counts = onehot.sum(0)
        means = (onehot.T @ x) / counts.clamp(min=1.0).unsqueeze(1)
        for j, i in enumerate(moving):  # an empty cluster (only when min_size == 0) keeps its old centroid
            block = slice(j * k, (j + 1) * k)
            centroids[i] = torch.where(counts[block].unsqueeze(1) > 0, means[block], centroids[i])
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
    if not bool(torch.isfinite(weight.detach()).all()):
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
