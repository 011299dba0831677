"""Section 2: clustering cost and quality of PMRC row selection against the `k-means-constrained` reference.

Run it with `python -m benchmarks --only clustering`.

For each matrix it times `select_rows(..., selection="pmrc")` (constrained k-means + picking the rows) and
`KMeansConstrained(n_clusters=k, size_min=r, n_init=10).fit` (the paper's reference: Bradley, Bennett and
Demiriz's min-cost flow, with OR-Tools), interleaved in one process, and reports medians. Quality is the
inertia of each clustering, both measured by the same float64 function on the labels (ours come from
`constrained_kmeans` with the same seed, i.e. exactly what `select_rows` clusters internally).

Then the whole SmolLM2-135M decomposition (`peft.get_peft_model` with ID-LoRA, clustering included), a profile
of where our clustering time goes, and, when CUDA is available, Llama-3-8B-shaped matrices on the GPU.
"""
from benchmarks.clustering.measure import add_arguments, run
from benchmarks.clustering.report import render

__all__ = ["add_arguments", "run", "render"]
