"""scCASE's objective and its projected-gradient updates, dense (exact mode, small n).

The model (Eq. 2 of the scCASE paper, ``../shared/papers/002_*.txt``), with ``X`` the
peaks x cells TF-IDF matrix (m x n), ``Z`` the n x n cell similarity, ``R`` a fixed 0/1
mask, ``W`` (m x K) and ``H`` (K x n) non-negative::

    F = |X (Z o R) - W H|^2 + lam |Z - H^T H|^2 + g1 |W|^2 + g2 |H|^2

Gradients are Eq. (5). ``W`` and ``Z`` take the exact line-search step along their gradient
(Eq. 6-11): ``F`` is quadratic in the step, so the minimiser is closed-form. The paper's
printed Eq. (7)-(8) drop the derivative of ``g1 |W|^2``; we keep it, so the step is the
exact minimiser of Eq. (6) as the paper defines it. ``H`` has quartic terms, so its step is
found by backtracking from 0.2. Every update is projected onto ``>= 0``.

Projection after an exact step can still raise ``F``; the paper does not say what to do
then. We halve that step until ``F`` does not rise (up to ``max_halvings`` times; else the
matrix is left as it was), so the loss never increases. The authors' code also resamples
``R`` and rescales the rows of ``H`` each iteration; neither is in the paper, and both make
the objective move between iterations, so we keep ``R`` fixed and ``H`` as optimised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["loss", "gradients", "grad_w", "grad_h", "grad_z", "step_w", "step_z", "SCCASEState", "iterate"]


def _sq(A: np.ndarray) -> float:
    return float(np.vdot(A, A))


def loss(X, Z, R, W, H, lam: float, g1: float, g2: float) -> float:
    """Eq. (2)."""
    return (_sq(X @ (Z * R) - W @ H) + lam * _sq(Z - H.T @ H) + g1 * _sq(W) + g2 * _sq(H))


def _residual(X, Z, R, W, H):
    return X @ (Z * R) - W @ H


def grad_w(X, Z, R, W, H, g1: float):
    """``dF/dW`` of Eq. (5)."""
    return -2 * _residual(X, Z, R, W, H) @ H.T + 2 * g1 * W


def grad_h(X, Z, R, W, H, lam: float, g2: float):
    """``dF/dH`` of Eq. (5)."""
    return (-2 * W.T @ _residual(X, Z, R, W, H) - 2 * lam * H @ (Z + Z.T) + 4 * lam * H @ (H.T @ H)
            + 2 * g2 * H)


def grad_z(X, Z, R, W, H, lam: float):
    """``dF/dZ`` of Eq. (5)."""
    return 2 * (X.T @ _residual(X, Z, R, W, H)) * R + 2 * lam * (Z - H.T @ H)


def gradients(X, Z, R, W, H, lam: float, g1: float, g2: float):
    """Eq. (5): ``dF/dW``, ``dF/dH``, ``dF/dZ``."""
    return grad_w(X, Z, R, W, H, g1), grad_h(X, Z, R, W, H, lam, g2), grad_z(X, Z, R, W, H, lam)


def step_w(X, Z, R, W, H, D, g1: float) -> float:
    """The ``delta`` minimising ``F(W - delta D)`` (Eq. 6)."""
    E = _residual(X, Z, R, W, H)
    DH = D @ H
    den = _sq(DH) + g1 * _sq(D)
    return 0.0 if den == 0 else (-float(np.vdot(E, DH)) + g1 * float(np.vdot(W, D))) / den


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


def _projected(F, A, D, delta, max_halvings):
    """``max(A - delta D, 0)`` with ``delta`` halved until ``F`` does not rise; ``A`` if never."""
    f0 = F(A)
    for _ in range(max_halvings + 1):
        B = np.maximum(A - delta * D, 0)
        f = F(B)
        if f <= f0:
            return B, f
        delta /= 2
    return A, f0


def iterate(X, Z, R, W, H, *, lam: float = 1e6, g1: float = 1.0, g2: float = 1.0, max_iter: int = 100,
            tol: float = 1e-6, h_step: float = 0.2, h_shrink: float = 0.2, max_backtracks: int = 10,
            max_halvings: int = 10, callback=None) -> SCCASEState:
    """Minimise Eq. (2) from ``(W, H, Z)``: each iteration updates ``Z``, then ``W``, then
    ``H`` (the order of the authors' code). Stops when ``|F_prev - F| / F_prev < tol`` or
    after ``max_iter`` iterations. ``callback(it, state)`` runs after every iteration."""
    X, Z, R, W, H = (np.asarray(a, dtype=np.float64) for a in (X, Z, R, W, H))
    st = SCCASEState(W=W.copy(), H=H.copy(), Z=Z.copy())
    f = loss(X, st.Z, R, st.W, st.H, lam, g1, g2)
    st.losses.append(f)
    for it in range(1, max_iter + 1):
        f_prev = f
        # each matrix's gradient at the iterate the previous update left
        dZ = grad_z(X, st.Z, R, st.W, st.H, lam)
        st.Z, f = _projected(lambda Z_: loss(X, Z_, R, st.W, st.H, lam, g1, g2), st.Z, dZ,
                             step_z(X, st.Z, R, st.W, st.H, dZ, lam), max_halvings)
        dW = grad_w(X, st.Z, R, st.W, st.H, g1)
        st.W, f = _projected(lambda W_: loss(X, st.Z, R, W_, st.H, lam, g1, g2), st.W, dW,
                             step_w(X, st.Z, R, st.W, st.H, dW, g1), max_halvings)
        dH = grad_h(X, st.Z, R, st.W, st.H, lam, g2)
        delta = h_step
        for _ in range(max_backtracks):
            Hn = np.maximum(st.H - delta * dH, 0)
            fn = loss(X, st.Z, R, st.W, Hn, lam, g1, g2)
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
