"""scCASE exact-mode updates (scatac_dist/ops/sccase.py) against an independent NumPy
implementation of Eq. (2) and (5) of the paper, on 300 bm0828 cells.

The reference below shares no code with the module: its loss is the Frobenius-norm form of
Eq. (2), its gradients are Eq. (5) written term by term, and its line-search steps are
found by fitting a parabola to its own loss along the search direction (F is exactly
quadratic in the step for W and Z), not by the closed forms the module uses.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from scatac_dist.ops import sccase

LAM, G1, G2 = 1e6, 1.0, 1.0


def ref_loss(X, Z, R, W, H):
    return (np.linalg.norm(X @ (Z * R) - W @ H, "fro") ** 2 + LAM * np.linalg.norm(Z - H.T @ H, "fro") ** 2
            + G1 * np.linalg.norm(W, "fro") ** 2 + G2 * np.linalg.norm(H, "fro") ** 2)


def ref_grads(X, Z, R, W, H):
    ZR = Z * R
    gW = -2 * X @ ZR @ H.T + 2 * W @ H @ H.T + 2 * G1 * W
    gH = -2 * W.T @ X @ ZR + 2 * W.T @ W @ H - 2 * LAM * H @ (Z + Z.T) + 4 * LAM * H @ H.T @ H + 2 * G2 * H
    gZ = 2 * (X.T @ X @ ZR) * R - 2 * (X.T @ W @ H) * R + 2 * LAM * Z - 2 * LAM * H.T @ H
    return gW, gH, gZ


def parabola_min(f, scale):
    """Minimiser of the quadratic ``f(t)``, from three evaluations, refined once at the
    found scale so that rounding does not depend on the first guess."""
    for _ in range(2):
        f0, f1, f2 = f(0.0), f(scale), f(2 * scale)
        a = (f2 - 2 * f1 + f0) / (2 * scale ** 2)
        b = (f1 - f0) / scale - a * scale
        scale = -b / (2 * a)
    return scale


def ref_accept(loss_of, A, G, t, f):
    """``max(A - t G, 0)``, halving ``t`` until the loss does not rise; ``A`` if it never does."""
    for _ in range(11):
        B = np.maximum(A - t * G, 0)
        fb = loss_of(B)
        if fb <= f:
            return B, fb
        t /= 2
    return A, f


def ref_run(X, Z, R, W, H, n_iter):
    losses = [ref_loss(X, Z, R, W, H)]
    for _ in range(n_iter):
        f = losses[-1]
        gZ = ref_grads(X, Z, R, W, H)[2]
        t = parabola_min(lambda s, Z=Z, W=W, H=H, gZ=gZ: ref_loss(X, Z - s * gZ, R, W, H), 1e-6 / np.abs(gZ).max())
        Z, f = ref_accept(lambda Zc, W=W, H=H: ref_loss(X, Zc, R, W, H), Z, gZ, t, f)
        gW = ref_grads(X, Z, R, W, H)[0]
        t = parabola_min(lambda s, Z=Z, W=W, H=H, gW=gW: ref_loss(X, Z, R, W - s * gW, H), 1e-6 / np.abs(gW).max())
        W, f = ref_accept(lambda Wc, Z=Z, H=H: ref_loss(X, Z, R, Wc, H), W, gW, t, f)
        gH = ref_grads(X, Z, R, W, H)[1]
        t = 0.2
        for _ in range(10):
            Hc = np.maximum(H - t * gH, 0)
            fc = ref_loss(X, Z, R, W, Hc)
            if fc <= f:
                H, f = Hc, fc
                break
            t *= 0.2
        losses.append(f)
    return np.array(losses), W, H, Z


@pytest.fixture(scope="module")
def problem(data_dir):
    folder = data_dir / "buenrostro2018_bm0828" / "filtered_peak_bc_matrix"
    with gzip.open(folder / "matrix.mtx.gz") as fh:
        C = sp.csr_matrix(scipy.io.mmread(fh)).T.tocsr()  # cells x peaks
    rng = np.random.default_rng(0)
    C = C[np.sort(rng.choice(C.shape[0], 300, replace=False))]
    B = (C > 0).astype(np.float64)
    cells_per_peak = np.asarray(B.sum(0)).ravel()
    keep = np.flatnonzero(cells_per_peak >= 0.01 * C.shape[0])          # scCASE's 1% rule
    # the 3,000 most accessible of those keep the default suite fast; Eq. (2) is unchanged
    keep = keep[np.argsort(-cells_per_peak[keep], kind="stable")[:3000]]
    C = C[:, keep].toarray()
    tf = C / C.sum(1, keepdims=True)
    X = (tf * np.log(C.shape[0] / (C > 0).sum(0))).T                       # Eq. (1), peaks x cells
    Bk = (C > 0).astype(float)
    inter = Bk @ Bk.T
    union = Bk.sum(1)[:, None] + Bk.sum(1)[None, :] - inter
    Z = inter / union
    Z /= Z.sum(0, keepdims=True)
    from sklearn.decomposition import NMF

    nmf = NMF(7, init="nndsvda", max_iter=500, random_state=0)
    W = nmf.fit_transform(X)
    H = nmf.components_
    R = (np.random.default_rng(1).random(Z.shape) < 0.95).astype(float)
    return X, Z, R, W, H


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    m, n, k = 9, 7, 3
    X, Z, W, H = rng.random((m, n)), rng.random((n, n)), rng.random((m, k)), rng.random((k, n))
    R = (rng.random((n, n)) < 0.8).astype(float)
    lam = 3.0
    dW, dH, dZ = sccase.gradients(X, Z, R, W, H, lam, 0.5, 0.7)
    for A, G, which in ((W, dW, "W"), (H, dH, "H"), (Z, dZ, "Z")):
        num = np.zeros_like(A)
        for idx in np.ndindex(A.shape):
            e = np.zeros_like(A)
            e[idx] = 1e-6
            args = {"W": W, "H": H, "Z": Z}
            args[which] = A + e
            fp = sccase.loss(X, args["Z"], R, args["W"], args["H"], lam, 0.5, 0.7)
            args[which] = A - e
            fm = sccase.loss(X, args["Z"], R, args["W"], args["H"], lam, 0.5, 0.7)
            num[idx] = (fp - fm) / 2e-6
        np.testing.assert_allclose(G, num, rtol=1e-5, atol=1e-6 * np.abs(num).max())


def test_line_search_steps_minimise_the_loss_along_the_gradient():
    rng = np.random.default_rng(4)
    X, Z, W, H = rng.random((12, 8)), rng.random((8, 8)), rng.random((12, 3)), rng.random((3, 8))
    R = (rng.random((8, 8)) < 0.9).astype(float)
    dW, _, dZ = sccase.gradients(X, Z, R, W, H, 5.0, 1.0, 1.0)
    tw = sccase.step_w(X, Z, R, W, H, dW, 1.0)
    tz = sccase.step_z(X, Z, R, W, H, dZ, 5.0)
    for t, f in ((tw, lambda s: sccase.loss(X, Z, R, W - s * dW, H, 5.0, 1.0, 1.0)),
                 (tz, lambda s: sccase.loss(X, Z - s * dZ, R, W, H, 5.0, 1.0, 1.0))):
        assert t > 0
        assert f(t) < f(0.99 * t) and f(t) < f(1.01 * t)


def test_exact_mode_matches_independent_reference(problem):
    X, Z, R, W, H = problem
    n_iter = 8
    st = sccase.iterate(X, Z, R, W, H, lam=LAM, g1=G1, g2=G2, max_iter=n_iter, tol=0)
    ref_losses, rW, rH, rZ = ref_run(X, Z, R, W, H, n_iter)
    np.testing.assert_allclose(st.losses, ref_losses, rtol=1e-5)
    for got, want in ((st.W, rW), (st.H, rH), (st.Z, rZ)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the loss never increases, and it does decrease
    assert np.all(np.diff(st.losses) <= 0)
    assert st.losses[-1] < st.losses[0]
    assert (st.W >= 0).all() and (st.H >= 0).all() and (st.Z >= 0).all()


def test_sccaser_reference_term_gradient_and_step():
    """Eq. (3)/(13): alpha |P - W1|^2 on W's first k1 columns (the masks M and N of Eq. 13)."""
    rng = np.random.default_rng(5)
    m, n, k, k1, alpha = 9, 7, 4, 2, 2.5
    X, Z, W, H = rng.random((m, n)), rng.random((n, n)), rng.random((m, k)), rng.random((k, n))
    R = (rng.random((n, n)) < 0.8).astype(float)
    Pm = rng.random((m, k1))
    f = sccase.loss(X, Z, R, W, H, 3.0, 0.5, 0.7, P=Pm, alpha=alpha)
    masked = (X @ (Z * R) - W @ H)
    ref = (np.sum(masked ** 2) + 3.0 * np.sum((Z - H.T @ H) ** 2) + 0.5 * np.sum(W ** 2) + 0.7 * np.sum(H ** 2)
           + alpha * np.sum((Pm - W[:, :k1]) ** 2))
    assert f == pytest.approx(ref, rel=1e-12)
    G = sccase.grad_w(X, Z, R, W, H, 0.5, P=Pm, alpha=alpha)
    num = np.zeros_like(W)
    for idx in np.ndindex(W.shape):
        e = np.zeros_like(W)
        e[idx] = 1e-6
        num[idx] = (sccase.loss(X, Z, R, W + e, H, 3.0, 0.5, 0.7, P=Pm, alpha=alpha)
                    - sccase.loss(X, Z, R, W - e, H, 3.0, 0.5, 0.7, P=Pm, alpha=alpha)) / 2e-6
    np.testing.assert_allclose(G, num, rtol=1e-5, atol=1e-6 * np.abs(num).max())
    t = sccase.step_w(X, Z, R, W, H, G, 0.5, P=Pm, alpha=alpha)
    fl = lambda s: sccase.loss(X, Z, R, W - s * G, H, 3.0, 0.5, 0.7, P=Pm, alpha=alpha)  # noqa: E731
    assert t > 0 and fl(t) < fl(0.99 * t) and fl(t) < fl(1.01 * t)
    st = sccase.iterate(X, Z, R, W, H, lam=3.0, g1=0.5, g2=0.7, max_iter=5, tol=0, P=Pm, alpha=alpha)
    assert np.all(np.diff(st.losses) <= 0) and st.losses[-1] < st.losses[0]
    with pytest.raises(ValueError, match="reference projection"):
        sccase.iterate(X, Z, R, W, H, P=rng.random((m + 1, k1)), alpha=1.0)


def test_simplex_projection_against_a_brute_force_minimiser():
    from scipy.optimize import minimize

    rng = np.random.default_rng(2)
    A = rng.normal(size=(6, 4))
    P = sccase.simplex_columns(A)
    np.testing.assert_allclose(P.sum(0), 1, rtol=1e-12)
    assert (P >= 0).all()
    np.testing.assert_allclose(sccase.simplex_columns(A.T, axis=1), P.T)
    for c in range(A.shape[1]):
        res = minimize(lambda x, c=c: np.sum((x - A[:, c]) ** 2), np.full(6, 1 / 6), method="SLSQP",
                       bounds=[(0, None)] * 6, constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
                       options={"ftol": 1e-14})
        np.testing.assert_allclose(P[:, c], res.x, atol=1e-6)
