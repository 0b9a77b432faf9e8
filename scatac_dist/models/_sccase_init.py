"""scCASE's starting ``W`` and ``H``: scikit-learn NMF of the TF-IDF matrix.

Up to ``nmf_cells`` cells the factorisation is of all of ``X``; above, of a seeded sample,
and each block of cells gets its ``H`` by non-negative least squares against that ``W``
(one Dask task per block of the memory-mapped pattern).
"""

from __future__ import annotations

import dask
import numpy as np
import scipy.sparse as sp
from dask import delayed

from . import sccase_pattern as data


def _nnls_block(folder, s, w, m, lo, hi, Wt, max_iter, seed):
    from sklearn.decomposition import non_negative_factorization

    indptr, indices = data.open_pattern(folder)
    a, b = indptr[lo], indptr[hi]
    B = sp.csr_matrix((np.ones(b - a), np.asarray(indices[a:b]), indptr[lo:hi + 1] - a), shape=(hi - lo, m))
    A = sp.csr_matrix(sp.diags(s[lo:hi]) @ B @ sp.diags(w))
    U, _, _ = non_negative_factorization(A, H=Wt, n_components=Wt.shape[0], init="custom", update_H=False,
                                         max_iter=max_iter, random_state=seed)
    return U


def nmf_init(pat: data.Pattern, K: int, *, seed: int = 0, nmf_cells: int = 20_000, max_iter: int = 500):
    """``W`` (m x K) and ``H`` (K x n) from scikit-learn NMF of ``X`` (Eq. 1 TF-IDF;
    ``init='nndsvda'``, seeded); see the module docstring for atlases."""
    from sklearn.decomposition import NMF

    if K > min(pat.n, pat.m):
        raise ValueError(f"K={K} factors but only {pat.n} cells and {pat.m} peaks")
    nmf = NMF(K, init="nndsvda", max_iter=max_iter, random_state=seed)
    if pat.n <= nmf_cells:
        U = nmf.fit_transform(data.pattern_rows(pat, np.arange(pat.n)))
        return nmf.components_.T.copy(), U.T.copy()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(pat.n, nmf_cells, replace=False))
    nmf.fit(data.pattern_rows(pat, rows))
    Wt = nmf.components_
    s, w, Wt_ = pat.shared_s(), data.share(pat.w), data.share(Wt)
    parts = [delayed(_nnls_block)(str(pat.folder), s, w, pat.m, lo, hi, Wt_, max_iter, seed)
             for lo, hi in pat.blocks()]
    return Wt.T.copy(), np.concatenate(dask.compute(*parts)).T.copy()
