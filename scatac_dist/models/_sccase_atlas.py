"""scCASE's updates with ``Z`` and ``R`` restricted to a sparse support (the atlas mode).

The problem is Eq. (2) (Eq. 3 with a reference) with ``Z[i, j] = 0`` fixed off the support
``S_j`` of each column: cell ``j`` and its ``k`` nearest cells (:mod:`.sccase_neighbors`),
and the similarity term taken over the support pairs only. With ``k = n - 1`` the updates
reproduce :func:`scatac_dist.ops.sccase.iterate` to rounding. Nothing ``n x n`` or ``m x n``
is formed; every term of the loss, the gradients and the step sizes goes through:

* the support arrays ``nbr``, ``Z``, ``R`` (n x (k+1)), held by the client;
* ``H`` (K x n), ``W`` (m x K) and ``H H^T`` (K x K);
* ``q_j = |X (Z o R)_j|^2`` and ``g = (X^T X (Z o R))`` on the support, from
  :func:`scatac_dist.ops.sccase_support.support_quad` (a Dask task per column block);
* ``X^T W`` (n x K) and ``X V`` (m x K), passes over the pattern (:mod:`.sccase_pattern`).

The loss expands as ``|X Zr - W H|^2 = sum_j q_j - 2 <Zr, S(X^T W, H)> + tr(W^T W H H^T)``,
where ``S(U, V)`` samples ``U V^T``-type products on the support pairs. Per iteration: two
passes of ``support_quad`` (the step of ``Z`` needs ``|X (D o R)|^2``; the updated ``Z``
gives the next ``q`` and ``g``), one ``X V`` and one ``X^T W``, each more only when a
projected step is halved. Why the similarity term leaves out the pairs off the support, with
the measurement: ``docs/methods/sccase.md``.

**Restart state.** The iterate at an iteration boundary is ``Z``, ``W``, ``H``, the losses so
far and the convergence flag; everything else an iteration starts from (``q``, ``g``,
``X^T W``, the sampled products) is a deterministic function of them, recomputed by
:func:`iterate_support` when it is given ``start``. :func:`save_state` writes such a state as
one ``.npz`` file atomically (a temporary file, fsync, ``os.replace``), so a kill leaves the
previous iteration's file or the new one, never a torn one; :func:`load_state` reads it back.
A run resumed from iteration ``k`` repeats exactly the operations of an uninterrupted run from
``k + 1`` on, so its results are bit-equal.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import dask
import numpy as np
import scipy.sparse as sp
from dask import delayed

from ..ops.sccase import SCCASEState, row_sums_to_one, simplex_columns
from ..ops.sccase_support import support_quad
from . import sccase_pattern as data

logger = logging.getLogger("scatac_dist")

_ROWS = 20_000  # support rows per vectorised chunk on the client (bounds temporaries)


def save_state(path: str | os.PathLike, **arrays) -> None:
    """Write ``arrays`` to ``path`` (``.npz``) atomically: a temporary file beside it,
    flushed to disk, then renamed over ``path``. Dicts are stored as JSON strings."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    out = {k: np.asarray(json.dumps(v)) if isinstance(v, dict) else np.asarray(v)
           for k, v in arrays.items()}
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **out)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash of the machine
    finally:
        os.close(fd)


def load_state(path: str | os.PathLike, json_keys: tuple = ()) -> dict | None:
    """The arrays :func:`save_state` wrote at ``path`` (``json_keys`` decoded), or ``None``
    when there is no such file or it cannot be read (then logged)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        for k in json_keys:
            out[k] = json.loads(str(out[k]))
    except Exception as exc:  # a file this code did not write whole: start afresh
        logger.warning("sccase: cannot read the restart state %s (%s); starting afresh", path, exc)
        return None
    return out


def sample(U: np.ndarray, V: np.ndarray, nbr: np.ndarray) -> np.ndarray:
    """``out[j, a] = U[nbr[j, a]] . V[j]`` (n x (k+1)), in row chunks."""
    out = np.empty(nbr.shape, np.float64)
    for lo in range(0, len(nbr), _ROWS):
        hi = lo + _ROWS
        out[lo:hi] = np.einsum("jak,jk->ja", U[nbr[lo:hi]], V[lo:hi])
    return out


def support_matrix(nbr: np.ndarray, vals: np.ndarray) -> sp.csc_matrix:
    """The n x n matrix whose column ``j`` holds ``vals[j]`` at rows ``nbr[j]`` (CSC)."""
    n, k = nbr.shape
    return sp.csc_matrix((vals.ravel(), nbr.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))


def _quad_task(folder, s, w, nbr, V, want_g):
    indptr, indices = data.open_pattern(folder)
    return support_quad(indptr, indices, s, w, nbr, V, want_g)


class SupportProblem:
    """Everything the updates need that does not change between iterations."""

    def __init__(self, pat: data.Pattern, nbr: np.ndarray, R: np.ndarray, *, lam: float, g1: float,
                 g2: float, P: np.ndarray | None, alpha: float):
        # int32 indices and a uint8 mask: the client holds these n x (k+1) arrays all run long
        self.pat, self.nbr, self.R = pat, np.ascontiguousarray(nbr, np.int32), np.asarray(R, np.uint8)
        self.lam, self.g1, self.g2, self.P, self.alpha = lam, g1, g2, P, alpha
        self.k1 = 0 if P is None else P.shape[1]

    def quad(self, V: np.ndarray, want_g: bool = True):
        """``q`` (n,) and ``g`` (n x (k+1)) for support values ``V``, one task per block."""
        pat = self.pat
        s, w = pat.shared_s(), data.share(pat.w)
        parts = [delayed(_quad_task, nout=2)(str(pat.folder), s, w, self.nbr[lo:hi], V[lo:hi], want_g)
                 for lo, hi in pat.blocks()]
        res = dask.compute(*parts)
        data.release_pages()  # whatever the client touched of the mapped pattern leaves its RSS
        q = np.concatenate([r[0] for r in res])
        g = np.concatenate([r[1] for r in res]) if want_g else None
        return q, g

    # -- the loss, split as the updates need it -----------------------------------------

    def ref_term(self, W):
        return self.alpha * float(np.sum((self.P - W[:, :self.k1]) ** 2)) if self.P is not None else 0.0

    def lam_term(self, Z, SH, HHt):
        """``lam |Z - H^T H|^2`` over the support pairs only: pairs off the support are not
        observed, rather than observed to be 0 (``docs/methods/sccase.md``)."""
        return self.lam * float(np.sum((Z - SH) ** 2))

    def loss(self, qsum, cross, Z, W, H, SH, HHt):
        """F from its pieces: ``qsum = sum_j q_j``, ``cross = tr(H^T W^T X Zr)``."""
        fit = qsum - 2 * cross + float(np.sum((W.T @ W) * HHt))
        return (fit + self.lam_term(Z, SH, HHt) + self.g1 * float(np.sum(W * W))
                + self.g2 * float(np.sum(H * H)) + self.ref_term(W))


def iterate_support(prob: SupportProblem, Z, W, H, *, max_iter: int = 100, tol: float = 1e-6,
                    h_step: float = 0.2, h_shrink: float = 0.2, max_backtracks: int = 10,
                    max_halvings: int = 10, z_simplex: bool = False, h_rows: bool = False, callback=None,
                    start: dict | None = None) -> SCCASEState:
    """The updates of :func:`scatac_dist.ops.sccase.iterate` on the support: ``Z`` is
    n x (k+1) (``Z[j, a]`` = entry ``(nbr[j, a], j)``), ``W`` m x K, ``H`` K x n. With
    ``z_simplex`` each column of Z (a row of the support array) is projected onto the simplex.

    ``callback(it, state)`` runs after each iteration (``state.converged`` and
    ``state.timings`` set), e.g. to save the iterate. ``start`` resumes a run: ``Z``, ``W``,
    ``H`` are then the iterate after iteration ``start['it']``, and ``start`` holds its
    ``losses`` (empty for iteration 0: the initial loss is computed), ``timings`` and
    ``converged``; the iterations go on from ``it + 1`` exactly as an uninterrupted run's.
    ``h_rows``: each row of ``H`` scaled to sum 1 at the start of every iteration (the authors'
    code; :func:`scatac_dist.ops.sccase.row_sums_to_one`)."""
    nbr, R, lam, g1, g2 = prob.nbr, prob.R, prob.lam, prob.g1, prob.g2
    P, alpha, k1 = prob.P, prob.alpha, prob.k1
    Z, W, H = (np.array(a, np.float64) for a in (Z, W, H))
    st = SCCASEState(W=W, H=H, Z=Z)
    q, g = prob.quad(Z * R)
    AW = data.times(prob.pat, W)                 # X^T W
    Ht = np.ascontiguousarray(H.T)
    SH, SAW, HHt = sample(Ht, Ht, nbr), sample(AW, Ht, nbr), H @ H.T
    first, timings = 1, []
    if start is not None and len(start["losses"]):
        first = int(start["it"]) + 1
        st.losses = [float(x) for x in start["losses"]]
        timings = [float(x) for x in start["timings"]]
        st.converged = bool(start["converged"])
        f = st.losses[-1]
    else:
        f = prob.loss(q.sum(), float(np.sum(Z * R * SAW)), Z, W, H, SH, HHt)
        st.losses.append(f)
    for it in range(first, max_iter + 1):
        if st.converged:
            break
        t0 = time.perf_counter()
        if h_rows:
            H = row_sums_to_one(H)
            Ht = np.ascontiguousarray(H.T)
            SH, SAW, HHt = sample(Ht, Ht, nbr), sample(AW, Ht, nbr), H @ H.T
            f = prob.loss(q.sum(), float(np.sum(Z * R * SAW)), Z, W, H, SH, HHt)
        f_prev = f
        # --- Z: exact line search along the gradient sampled on the support, projected
        D = 2 * R * (g - SAW) + 2 * lam * (Z - SH)
        DR = D * R
        qD, _ = prob.quad(DR, want_g=False)
        num = float(np.sum(DR * g)) - float(np.sum(DR * SAW)) + lam * float(np.sum((Z - SH) * D))
        den = float(qD.sum()) + lam * float(np.sum(D * D))
        delta = 0.0 if den == 0 else num / den
        for _ in range(max_halvings + 1):
            Zn = simplex_columns(Z - delta * D, axis=1) if z_simplex else np.maximum(Z - delta * D, 0)
            qn, gn = prob.quad(Zn * R)
            fn = prob.loss(qn.sum(), float(np.sum(Zn * R * SAW)), Zn, W, H, SH, HHt)
            if fn <= f:
                Z, q, g, f = Zn, qn, gn, fn
                break
            delta /= 2
        del D, DR, Zn, qn, gn
        ZR = Z * R
        ZRs = support_matrix(nbr, ZR)
        # --- W: exact line search
        V = np.asarray(ZRs @ Ht)                 # (Z o R) H^T, n x K
        XV = data.t_times(prob.pat, V)           # X (Z o R) H^T, m x K
        qsum = float(q.sum())
        DW = -2 * XV + 2 * W @ HHt + 2 * g1 * W
        if P is not None:
            DW[:, :k1] -= 2 * alpha * (P - W[:, :k1])
        num = -(float(np.sum(DW * XV)) - float(np.sum((DW.T @ W) * HHt))) + g1 * float(np.sum(W * DW))
        den = float(np.sum((DW.T @ DW) * HHt)) + g1 * float(np.sum(DW * DW))
        if P is not None:
            num -= alpha * float(np.sum((P - W[:, :k1]) * DW[:, :k1]))
            den += alpha * float(np.sum(DW[:, :k1] ** 2))
        delta = 0.0 if den == 0 else num / den
        for _ in range(max_halvings + 1):
            Wn = np.maximum(W - delta * DW, 0)
            fn = prob.loss(qsum, float(np.sum(Wn * XV)), Z, Wn, H, SH, HHt)
            if fn <= f:
                W, f = Wn, fn
                break
            delta /= 2
        del V, XV, DW, Wn
        AW = data.times(prob.pat, W)
        # --- H: backtracking from h_step
        WtXZR = np.asarray(ZRs.T @ AW).T          # W^T X (Z o R), K x n
        Es = support_matrix(nbr, Z - SH)           # (Z - H^T H) on the support
        HE = np.asarray(Es.T @ Ht).T + np.asarray(Es @ Ht).T   # H (E + E^T)
        WtW = W.T @ W
        DH = -2 * WtXZR + 2 * WtW @ H - 2 * lam * HE + 2 * g2 * H
        del Es, ZRs, ZR
        step = h_step
        for _ in range(max_backtracks):
            Hn = np.maximum(H - step * DH, 0)
            Hnt = np.ascontiguousarray(Hn.T)
            SHn, HHtn = sample(Hnt, Hnt, nbr), Hn @ Hn.T
            fn = prob.loss(qsum, float(np.sum(Hn * WtXZR)), Z, W, Hn, SHn, HHtn)
            if fn <= f:
                H, Ht, SH, HHt, f = Hn, Hnt, SHn, HHtn, fn
                break
            step *= h_shrink
        SAW = sample(AW, Ht, nbr)
        st.W, st.H, st.Z = W, H, Z
        st.losses.append(f)
        timings.append(time.perf_counter() - t0)
        logger.info("sccase (atlas): iteration %d, loss %.6g, %.1f s", it, f, timings[-1])
        st.converged = bool(f_prev == 0 or abs(f_prev - f) / f_prev < tol)
        st.timings = timings
        if callback is not None:
            callback(it, st)
    st.timings = timings
    return st
