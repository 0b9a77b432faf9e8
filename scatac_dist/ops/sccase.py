"""scCASE's objective and its projected-gradient updates, dense (exact mode, small n).

Eq. (2) of the scCASE paper, with ``X`` the peaks x cells TF-IDF matrix (m x n), ``Z`` the
n x n cell similarity, ``R`` a fixed 0/1 mask, ``W`` (m x K) and ``H`` (K x n) non-negative::

    F = |X (Z o R) - W H|^2 + lam |Z - H^T H|^2 + g1 |W|^2 + g2 |H|^2

plus ``alpha |P - W1|^2`` for scCASER (Eq. 3, 13-14; every function takes ``P=None``).
Gradients (Eq. 5), the exact line-search steps of ``W`` and ``Z`` (Eq. 6-11), backtracking
for ``H`` and the projection onto ``>= 0``; :func:`iterate` runs them. Pure NumPy/SciPy, no
store. Where this departs from the printed equations (the ``g1`` term of Eq. 7-8, halving a
projected step that raises ``F``, ``R`` fixed, the optional simplex projection of ``Z``) and
the measurements: ``docs/methods/sccase.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

__all__ = ["loss", "gradients", "grad_w", "grad_h", "grad_z", "step_w", "step_z", "SCCASEState", "iterate",
           "simplex_columns"]


def _sq(A: np.ndarray) -> float:
    return float(np.vdot(A, A))


def _ref_gap(W, P):
    """``P - W1`` (``W1`` the first ``P.shape[1]`` columns of ``W``)."""
    return P - W[:, :P.shape[1]]


def loss(X, Z, R, W, H, lam: float, g1: float, g2: float, P=None, alpha: float = 0.0) -> float:
    """Eq. (2); with ``P``, Eq. (3)/(13)."""
    f = _sq(X @ (Z * R) - W @ H) + lam * _sq(Z - H.T @ H) + g1 * _sq(W) + g2 * _sq(H)
    return f + (alpha * _sq(_ref_gap(W, P)) if P is not None else 0.0)


def _residual(X, Z, R, W, H):
    return X @ (Z * R) - W @ H


def grad_w(X, Z, R, W, H, g1: float, P=None, alpha: float = 0.0):
    """``dF/dW`` of Eq. (5) (with ``P``: plus ``-2 alpha (P - W1)`` on W1's columns)."""
    G = -2 * _residual(X, Z, R, W, H) @ H.T + 2 * g1 * W
    if P is not None:
        G[:, :P.shape[1]] -= 2 * alpha * _ref_gap(W, P)
    return G


def grad_h(X, Z, R, W, H, lam: float, g2: float):
    """``dF/dH`` of Eq. (5)."""
    return (-2 * W.T @ _residual(X, Z, R, W, H) - 2 * lam * H @ (Z + Z.T) + 4 * lam * H @ (H.T @ H)
            + 2 * g2 * H)


def grad_z(X, Z, R, W, H, lam: float):
    """``dF/dZ`` of Eq. (5)."""
    return 2 * (X.T @ _residual(X, Z, R, W, H)) * R + 2 * lam * (Z - H.T @ H)


def gradients(X, Z, R, W, H, lam: float, g1: float, g2: float, P=None, alpha: float = 0.0):
    """Eq. (5): ``dF/dW``, ``dF/dH``, ``dF/dZ``."""
    return (grad_w(X, Z, R, W, H, g1, P, alpha), grad_h(X, Z, R, W, H, lam, g2),
            grad_z(X, Z, R, W, H, lam))


def step_w(X, Z, R, W, H, D, g1: float, P=None, alpha: float = 0.0) -> float:
    """The ``delta`` minimising ``F(W - delta D)`` (Eq. 6)."""
    E = _residual(X, Z, R, W, H)
    DH = D @ H
    num = -float(np.vdot(E, DH)) + g1 * float(np.vdot(W, D))
    den = _sq(DH) + g1 * _sq(D)
    if P is not None:
        D1 = D[:, :P.shape[1]]
        num -= alpha * float(np.vdot(_ref_gap(W, P), D1))
        den += alpha * _sq(D1)
    return 0.0 if den == 0 else num / den


def step_z(X, Z, R, W, H, D, lam: float) -> float:
    """The ``delta`` minimising ``F(Z - delta D)`` (Eq. 9-11)."""
    E = _residual(X, Z, R, W, H)
    XD = X @ (D * R)
    den = _sq(XD) + lam * _sq(D)
    return 0.0 if den == 0 else (float(np.vdot(E, XD)) + lam * float(np.vdot(Z - H.T @ H, D))) / den


@dataclass
class SCCASEState:
    """The iterate and its history: ``losses[0]`` is the loss at the start."""

    W: np.ndarray
    H: np.ndarray
    Z: np.ndarray
    losses: list = field(default_factory=list)
    converged: bool = False


def simplex_columns(A: np.ndarray, axis: int = 0) -> np.ndarray:
    """Euclidean projection of each column (``axis=0``) or row (``axis=1``) of ``A`` onto
    the probability simplex (Held, Wolfe and Crowder 1974; the sort-based algorithm)."""
    V = A if axis == 0 else A.T
    U = -np.sort(-V, axis=0)
    css = np.cumsum(U, axis=0) - 1.0
    ind = np.arange(1, V.shape[0] + 1)[:, None]
    rho = np.count_nonzero(U - css / ind > 0, axis=0)          # the last index where it holds
    theta = css[rho - 1, np.arange(V.shape[1])] / rho
    out = np.maximum(V - theta[None, :], 0)
    return out if axis == 0 else out.T


def _nonneg(A):
    return np.maximum(A, 0)


def _projected(F, A, D, delta, max_halvings, project=_nonneg):
    """``project(A - delta D)`` with ``delta`` halved until ``F`` does not rise; ``A`` if never."""
    f0 = F(A)
    for _ in range(max_halvings + 1):
        B = project(A - delta * D)
        f = F(B)
        if f <= f0:
            return B, f
        delta /= 2
    return A, f0


def row_sums_to_one(H: np.ndarray) -> np.ndarray:
    """``H`` with each row divided by its sum (a zero row stays zero), as the authors' code
    rescales the factors' cell loadings every iteration."""
    return H / (H.sum(1, keepdims=True) + np.finfo(np.float64).eps)


def iterate(X, Z, R, W, H, *, lam: float = 1e6, g1: float = 1.0, g2: float = 1.0, max_iter: int = 100,
            tol: float = 1e-6, h_step: float = 0.2, h_shrink: float = 0.2, max_backtracks: int = 10,
            max_halvings: int = 10, P=None, alpha: float = 0.0, z_simplex: bool = False,
            h_rows: bool = False, callback=None) -> SCCASEState:
    """Minimise Eq. (2) from ``(W, H, Z)``: each iteration updates ``Z``, then ``W``, then
    ``H`` (the order of the authors' code). Stops when ``|F_prev - F| / F_prev < tol`` or
    after ``max_iter`` iterations. ``callback(it, state)`` runs after every iteration.
    ``P``/``alpha``: scCASER's reference term (``W``'s first ``P.shape[1]`` columns are W1).
    ``z_simplex``: project Z's columns onto the simplex (sum 1, as the paper defines ``Z``)
    rather than onto ``>= 0`` (the printed update). ``h_rows``: scale each row of ``H`` to sum
    1 at the start of every iteration, as the authors' code does (not in the paper)."""
    # X may stay sparse (every product with it is X @ dense or X.T @ dense)
    X = X.astype(np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    Z, R, W, H = (np.asarray(a, dtype=np.float64) for a in (Z, R, W, H))
    if P is not None:
        P = np.asarray(P, dtype=np.float64)
        if P.shape[0] != W.shape[0] or P.shape[1] > W.shape[1]:
            raise ValueError(f"reference projection P is {P.shape}; it needs {W.shape[0]} rows and at most "
                             f"{W.shape[1]} columns (the factors of W)")
    ref = dict(P=P, alpha=alpha)
    st = SCCASEState(W=W.copy(), H=H.copy(), Z=Z.copy())
    f = loss(X, st.Z, R, st.W, st.H, lam, g1, g2, **ref)
    st.losses.append(f)
    for it in range(1, max_iter + 1):
        if h_rows:
            st.H = row_sums_to_one(st.H)
            f = loss(X, st.Z, R, st.W, st.H, lam, g1, g2, **ref)
        f_prev = f
        # each matrix's gradient at the iterate the previous update left
        dZ = grad_z(X, st.Z, R, st.W, st.H, lam)
        st.Z, f = _projected(lambda Z_: loss(X, Z_, R, st.W, st.H, lam, g1, g2, **ref), st.Z, dZ,
                             step_z(X, st.Z, R, st.W, st.H, dZ, lam), max_halvings,
                             simplex_columns if z_simplex else _nonneg)
        dW = grad_w(X, st.Z, R, st.W, st.H, g1, **ref)
        st.W, f = _projected(lambda W_: loss(X, st.Z, R, W_, st.H, lam, g1, g2, **ref), st.W, dW,
                             step_w(X, st.Z, R, st.W, st.H, dW, g1, **ref), max_halvings)
        dH = grad_h(X, st.Z, R, st.W, st.H, lam, g2)
        delta = h_step
        for _ in range(max_backtracks):
            Hn = np.maximum(st.H - delta * dH, 0)
            fn = loss(X, st.Z, R, st.W, Hn, lam, g1, g2, **ref)
            if fn <= f:
                st.H, f = Hn, fn
                break
            delta *= h_shrink
        st.losses.append(f)
        if callback is not None:
            callback(it, st)
        if f_prev == 0 or abs(f_prev - f) / f_prev < tol:
            st.converged = True
            break
    return st
