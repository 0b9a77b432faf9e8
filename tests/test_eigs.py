"""The distributed eigen-solvers against a dense NumPy eigendecomposition.

The operator mimics the spectral embedding's: ``M = A A^T - diag(d)`` with a few separated
eigenvalues followed by a bulk of nearly equal ones, the case where subspace iteration
stalls and LOBPCG must not.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from scatac_dist.tl.linalg import subspace_eigs
from scatac_dist.tl.lobpcg import lobpcg_eigs


def _operator(n=1500, m=800, seed=0):
    rng = np.random.default_rng(seed)
    # 6 groups of rows sharing sparse profiles, plus noise: a handful of large eigenvalues,
    # then a slowly decaying bulk
    groups = rng.integers(0, 6, n)
    profile = rng.random((6, m)) < 0.05
    noise = rng.random((n, m)) < 0.03
    keep = rng.random((n, m)) < 0.6
    A = sp.csr_matrix(((profile[groups] & keep) | noise).astype(np.float32))
    A = sp.diags(1 / np.sqrt(np.asarray(A.sum(1)).ravel() + 1)) @ A
    A = sp.csr_matrix(A, dtype=np.float32)
    d = np.asarray(A.multiply(A).sum(1)).ravel()  # zero the diagonal of A A^T, as spectral does
    dense = A.toarray().astype(np.float64)
    M = dense @ dense.T - np.diag(d)
    ev, V = np.linalg.eigh(M)
    order = np.argsort(-ev)
    blocks = [A[i:i + 400] for i in range(0, n, 400)]
    lazy = da.concatenate([da.from_delayed(dask.delayed(b), shape=b.shape, dtype=np.float32,
                                           meta=sp.csr_matrix((0, 0), dtype=np.float32)) for b in blocks])
    return lazy, d, ev[order], V[:, order], dense


def test_lobpcg_matches_dense_eigh_including_the_bulk(client):
    A, d, ev, V, dense = _operator()
    k = 20
    gaps = -np.diff(ev[:k + 11])
    assert gaps[6:].max() < 0.05 * ev[0]  # the test operator does have a clustered bulk
    got, U, AtU = lobpcg_eigs(A, k, diag=d, n_iter=30, seed=1)
    np.testing.assert_allclose(got, ev[:k], rtol=1e-4, atol=1e-6 * ev[0])
    # each vector is an eigenvector: small residual ...
    M_U = dense @ (dense.T @ U) - d[:, None] * U
    assert np.abs(M_U - U * got).max() < 1e-3 * ev[0]
    # ... orthonormal, and the A^T images match
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-4)
    np.testing.assert_allclose(AtU, dense.T @ U, atol=1e-4 * np.abs(AtU).max())
    # the separated leading subspace agrees with NumPy
    cos = np.linalg.svd(U[:, :6].T @ V[:, :6], compute_uv=False)
    assert cos.min() > 0.9999


def test_lobpcg_beats_subspace_iteration_on_the_bulk(client):
    """Same number of passes over A: subspace iteration misses the bulk eigenvalues that
    LOBPCG finds. This is why spectral uses LOBPCG."""
    A, d, ev, V, dense = _operator(seed=2)
    k = 20
    lob, *_ = lobpcg_eigs(A, k, diag=d, n_iter=10, n_oversamples=10, seed=0)
    sub, *_ = subspace_eigs(A, k, diag=d, n_iter=10, n_oversamples=10, seed=0)
    err_lob = np.abs(lob - ev[:k]).max()
    err_sub = np.abs(sub - ev[:k]).max()
    assert err_lob < err_sub / 10
