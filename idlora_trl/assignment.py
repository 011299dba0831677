"""The size-constrained assignment step of PMRC's k-means, exact, for a batch of problems at once.

Problem: ``n`` points, ``k`` clusters, costs ``D`` (``[n, k]``, squared distances to the centroids); give every
point one cluster so that each cluster holds at least ``min_size`` points, at the least total cost. It is a
transportation problem with ``k`` sinks, solved here through its LP dual, one *price* ``lam[c] >= 0`` per cluster:

* points take ``argmin_c D[x, c] - lam[c]``; while some cluster is short of points, the most deficient one has
  its price raised by the least amount that makes ``min_size`` points prefer it. Every point stays at an argmin
  of ``D - lam``, and a raised cluster ends with exactly ``min_size`` points, so when every cluster is full the
  assignment satisfies complementary slackness and is optimal. When the unconstrained assignment is already
  feasible (the common case) no price is ever raised;
* a raised cluster can fall short again when a later raise pulls points from it; it is then raised again (a
  raised cluster only ever loses points to others, so at the end every raised cluster holds exactly
  ``min_size`` points and the argument above still holds). Single-price raises can ping-pong when several
  clusters compete for the same points, so after ``ROUNDS_PER_CLUSTER * k`` rounds successive shortest paths
  (:func:`shortest_path_repair`, one point per augmentation, still exact) finish the problems left short, so
  the constraint always holds.

:func:`assign` takes ``[n, k]`` or a batch ``[b, n, k]``: the price rounds run for every problem of the batch
at once (a handful of tensor operations per round, whatever ``b``), which is how k-means runs its restarts and
its seeding candidates together. Only the problems the prices leave short go through the (Python, CPU)
shortest paths, one by one.
"""
from __future__ import annotations

import heapq
import math

import numpy as np
import torch

__all__ = ["assign", "shortest_path_repair"]


# Price rounds before the shortest paths take over: a cluster that lost points to a later raise is raised
# again, which converges but can ping-pong between clusters competing for the same points.
ROUNDS_PER_CLUSTER = 4


def _counts(labels: torch.Tensor, k: int) -> torch.Tensor:
    """``[b, k]`` cluster sizes of ``[b, n]`` labels."""
    return torch.zeros(labels.shape[0], k, dtype=torch.long, device=labels.device).scatter_add_(
        1, labels, torch.ones_like(labels))


def assign(dist: torch.Tensor, min_size: int, max_rounds: int | None = None) -> torch.Tensor:
    """Optimal labels (int64, ``[n]`` or ``[b, n]``) of the points under costs ``dist`` (``[n, k]`` or
    ``[b, n, k]``) with every cluster holding at least ``min_size`` points. ``max_rounds`` caps the price rounds
    (default ``ROUNDS_PER_CLUSTER * k``; tests use 0 to exercise the shortest paths alone)."""
    if dist.dim() == 2:
        return assign(dist.unsqueeze(0), min_size, max_rounds).squeeze(0)
    b, n, k = dist.shape
    labels = dist.argmin(2)
    counts = _counts(labels, k)
    short = (counts < min_size).any(1)
    if min_size == 0 or not bool(short.any()):
        return labels  # unconstrained optimum is feasible, hence optimal
    todo = short.nonzero().squeeze(1)
    # The problems still short of points: their costs, prices, labels and counts (shrunk as problems finish).
    ids, sub, lab, cnt = todo, dist[todo], labels[todo], counts[todo]
    lam = sub.new_zeros(len(todo), k)
    for _ in range(ROUNDS_PER_CLUSTER * k if max_rounds is None else max_rounds):
        c = cnt.argmin(1, keepdim=True)  # the most deficient cluster of each problem
        cost = sub - lam.unsqueeze(1)
        column = c.unsqueeze(1).expand(-1, n, 1)
        others = cost.scatter(2, column, math.inf).amin(2)  # each point's best cluster other than c
        # Pull in the (min_size - count) outsiders with the smallest margins (ties: as topk orders them) and raise
        # lam[c] by exactly the largest of those margins: every point stays at an argmin of dist - lam, c ends
        # with exactly min_size points and no other cluster gains any.
        outside = torch.where(lab == c, math.inf, cost.gather(2, column).squeeze(2) - others)
        need = min_size - cnt.gather(1, c)  # [p, 1], >= 1
        values, order = outside.topk(int(need.max()), dim=1, largest=False)  # ascending
        lam.scatter_add_(1, c, values.gather(1, need - 1).clamp(min=0))
        pulled = torch.arange(order.shape[1], device=dist.device).unsqueeze(0) < need
        lab = lab.scatter(1, order, torch.where(pulled, c, lab.gather(1, order)))
        cnt = _counts(lab, k)
        done = (cnt >= min_size).all(1)
        if bool(done.any()):
            labels[ids[done]] = lab[done]
            keep = ~done
            ids, sub, lab, cnt, lam = ids[keep], sub[keep], lab[keep], cnt[keep], lam[keep]
            if not len(ids):
                return labels
    for j, problem in enumerate(ids.tolist()):
        labels[problem] = shortest_path_repair(sub[j], lab[j], min_size)
    return labels


def shortest_path_repair(dist: torch.Tensor, labels: torch.Tensor, min_size: int) -> torch.Tensor:
    """Successive shortest paths: move one point at a time along the cheapest chain of reassignments
    (i -> j -> ... -> c) from a cluster above ``min_size`` to a deficient cluster ``c``. Exact when
    ``labels`` is optimal for its own counts (true for any ``argmin(dist - lam)``) and clusters above
    ``min_size`` have zero price (true after the price rounds of :func:`assign`).

    Runs in float64 on the CPU, in numpy and Python (``dist`` is only ``[n, k]``). The members of each cluster
    are ranked once by the cost of moving them to each other cluster, so an augmentation costs about O(k^3 + k^2 log n):
    Bellman-Ford over the k clusters (edge i -> j = cheapest move from i to j), one point moved per edge."""
    n, k = dist.shape
    dd, lab_np = dist.detach().double().cpu().numpy(), labels.cpu().numpy()
    d, lab = dd.tolist(), lab_np.tolist()
    tol = 1e-9 * float(np.abs(dd).max())  # ignore float32 round-off "improvements" (no spurious cycles)
    counts = np.bincount(lab_np, minlength=k).tolist()
    # ranked[i][j]: the initial members of i by ascending cost of moving them to j, ties by row index (read with
    # a pointer that skips points gone from i); arrivals[i][j]: a heap of (cost, point) for points that joined
    # i later. One stable sort of every point's move costs, split by cluster.
    order = np.argsort(dd - dd[np.arange(n), lab_np][:, None], axis=0, kind="stable")  # [n, k]
    ranked = [[order[lab_np[order[:, j]] == i, j].tolist() for j in range(k)] for i in range(k)]
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
            return torch.as_tensor(np.asarray(lab, dtype=np.int64), device=labels.device)
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
