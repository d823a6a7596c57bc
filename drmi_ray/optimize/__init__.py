"""Subset optimizer: choose K of N pool images with the least summed pairwise MI (DRMI step 3).

Minimise ``f(S) = Σ_{i<j ∈ S} MI(i, j)`` over subsets ``|S| = K`` (a quadratic selection problem,
NP-hard in general) by iterated local search over swaps; one algorithm, two backends.

Modules
  ``search``       ``select(mi, k)``: one process, dense matrix, numba kernels; also
                   ``select_coverage`` (greedy facility location) and ``Selection``,
                   ``check_mi``, ``objective``
  ``exact``        ``exact_select(mi, k)``: the oracle for small pools (brute force or scipy ``milp``)
  ``distributed``  ``select_distributed(source, k)``: Ray actors read the matrix themselves
                   (``.npy`` path, tile-store URL or in-memory array; ``MatrixSource``)

Per-partition budgets and selection (``select_partitioned``, ``kmeans_partitions``) live in
``drmi_ray.partition``, so ImageNet-sized pools never need the full matrix.

Example::

    mi = pairwise_mi(images)                     # (N, N) float64, entropy on the diagonal
    sel = select(mi, 600, seed=0)                # sel.indices (600,) int64, sel.objective float
"""

from drmi_ray.optimize.distributed import MatrixSource, select_distributed
from drmi_ray.optimize.exact import exact_select
from drmi_ray.optimize.search import TOL, Selection, check_mi, objective, select, select_coverage

__all__ = ["TOL", "MatrixSource", "Selection", "check_mi", "exact_select", "objective", "select", "select_coverage", "select_distributed"]
