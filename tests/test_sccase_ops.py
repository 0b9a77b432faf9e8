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


def ref_loss(X, Z, R, W, H, lam=LAM, g1=G1, g2=G2, P=None, alpha=0.0):
    """Eq. (2) in Frobenius norms; with ``P``, plus Eq. (3)'s ``alpha |P - W1|^2``."""
    f = (np.linalg.norm(X @ (Z * R) - W @ H, "fro") ** 2 + lam * np.linalg.norm(Z - H.T @ H, "fro") ** 2
         + g1 * np.linalg.norm(W, "fro") ** 2 + g2 * np.linalg.norm(H, "fro") ** 2)
    if P is not None:
        f += alpha * np.linalg.norm(P - W[:, :P.shape[1]], "fro") ** 2
    return f


def ref_grads(X, Z, R, W, H, lam=LAM, g1=G1, g2=G2, P=None, alpha=0.0):
    """Eq. (5) term by term (Eq. 13's extra ``-2 alpha (P - W1)`` on W1 with ``P``)."""
    ZR = Z * R
    gW = -2 * X @ ZR @ H.T + 2 * W @ H @ H.T + 2 * g1 * W
    if P is not None:
        gW[:, :P.shape[1]] -= 2 * alpha * (P - W[:, :P.shape[1]])
    gH = -2 * W.T @ X @ ZR + 2 * W.T @ W @ H - 2 * lam * H @ (Z + Z.T) + 4 * lam * H @ H.T @ H + 2 * g2 * H
    gZ = 2 * (X.T @ X @ ZR) * R - 2 * (X.T @ W @ H) * R + 2 * lam * Z - 2 * lam * H.T @ H
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


def ref_accept(loss_of, A, G, t, f, max_halvings=10):
    """``max(A - t G, 0)``, halving ``t`` until the loss does not rise; ``A`` if it never does.
    Returns the matrix, its loss and how many halvings it took (``None``: rejected)."""
    for j in range(max_halvings + 1):
        B = np.maximum(A - t * G, 0)
        fb = loss_of(B)
        if fb <= f:
            return B, fb, j
        t /= 2
    return A, f, None


def ref_step(X, Z, R, W, H, *, lam=LAM, g1=G1, g2=G2, P=None, alpha=0.0, max_halvings=10, h_step=0.2,
             h_shrink=0.2, max_backtracks=10):
    """One iteration (Z, then W, then H), with what each acceptance rule did: halvings of the
    Z and W steps, backtracks of H's (``None``: the matrix was kept)."""
    def F(Z, W, H):
        return ref_loss(X, Z, R, W, H, lam, g1, g2, P, alpha)

    f, diag = F(Z, W, H), {}
    gZ = ref_grads(X, Z, R, W, H, lam, g1, g2, P, alpha)[2]
    t = parabola_min(lambda s: F(Z - s * gZ, W, H), 1e-6 / np.abs(gZ).max())
    Z, f, diag["Z"] = ref_accept(lambda Zc: F(Zc, W, H), Z, gZ, t, f, max_halvings)
    gW = ref_grads(X, Z, R, W, H, lam, g1, g2, P, alpha)[0]
    t = parabola_min(lambda s: F(Z, W - s * gW, H), 1e-6 / np.abs(gW).max())
    W, f, diag["W"] = ref_accept(lambda Wc: F(Z, Wc, H), W, gW, t, f, max_halvings)
    gH = ref_grads(X, Z, R, W, H, lam, g1, g2, P, alpha)[1]
    t, diag["H"] = h_step, None
    for j in range(max_backtracks):
        Hc = np.maximum(H - t * gH, 0)
        fc = F(Z, W, Hc)
        if fc <= f:
            H, f, diag["H"] = Hc, fc, j
            break
        t *= h_shrink
    return Z, W, H, f, diag


def ref_run(X, Z, R, W, H, n_iter, **kw):
    losses = [ref_loss(X, Z, R, W, H, **{k: kw[k] for k in ("lam", "g1", "g2", "P", "alpha") if k in kw})]
    for _ in range(n_iter):
        Z, W, H, f, _ = ref_step(X, Z, R, W, H, **kw)
        losses.append(f)
    return np.array(losses), W, H, Z


def recorded_iterates(X, Z, R, W, H, **kw):
    """Run :func:`sccase.iterate`, keeping a copy of every iterate through its callback."""
    seen = [(W.copy(), H.copy(), Z.copy())]
    st = sccase.iterate(X, Z, R, W, H, callback=lambda it, s: seen.append((s.W.copy(), s.H.copy(), s.Z.copy())),
                        **kw)
    return st, seen


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


def test_line_search_steps_are_the_exact_minimisers():
    """Eq. (6)-(11): the closed-form steps equal the minimiser of the loss along the gradient,
    found from the reference loss alone (F is quadratic in the step)."""
    rng = np.random.default_rng(4)
    X, Z, W, H = rng.random((12, 8)), rng.random((8, 8)), rng.random((12, 3)), rng.random((3, 8))
    R = (rng.random((8, 8)) < 0.9).astype(float)
    kw = dict(lam=5.0, g1=1.0, g2=1.0)
    dW, _, dZ = ref_grads(X, Z, R, W, H, **kw)
    tw = sccase.step_w(X, Z, R, W, H, dW, 1.0)
    tz = sccase.step_z(X, Z, R, W, H, dZ, 5.0)
    for t, f in ((tw, lambda s: ref_loss(X, Z, R, W - s * dW, H, **kw)),
                 (tz, lambda s: ref_loss(X, Z - s * dZ, R, W, H, **kw))):
        assert t == pytest.approx(parabola_min(f, 1e-3), rel=1e-7)
        assert f(t) < f(0.99 * t) and f(t) < f(1.01 * t)


def test_exact_mode_matches_independent_reference(problem):
    X, Z, R, W, H = problem
    n_iter = 8
    st, seen = recorded_iterates(X, Z, R, W, H, lam=LAM, g1=G1, g2=G2, max_iter=n_iter, tol=0)
    ref_losses, rW, rH, rZ = ref_run(X, Z, R, W, H, n_iter)
    np.testing.assert_allclose(st.losses, ref_losses, rtol=1e-5)
    for got, want in ((st.W, rW), (st.H, rH), (st.Z, rZ)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # each recorded loss is Eq. (2) of the iterate it belongs to, and the first is the start's
    assert len(seen) == len(st.losses) == n_iter + 1
    np.testing.assert_allclose(st.losses, [ref_loss(X, Zi, R, Wi, Hi) for Wi, Hi, Zi in seen], rtol=1e-10)
    assert st.losses[-1] < 0.999 * st.losses[0]                    # and the iterations did move it


def rule_problem(seed):
    """Tiny problems with mixed-sign X and near-collinear factors, where the projected exact
    step of W or Z can raise the loss (the reference says when: see the test below)."""
    rng = np.random.default_rng(seed)
    m, n, k = 2, 3, 2
    X = rng.normal(size=(m, n))
    Z = rng.random((n, n)) * (rng.random((n, n)) < 0.6)
    W = rng.random((m, k)) * (rng.random((m, k)) < 0.6)
    H = rng.normal(size=(k, n))
    return X, Z, np.ones((n, n)), W, H


RULE = dict(lam=0.05, g1=0.01, g2=0.01)


@pytest.mark.parametrize("seed, which, halvings", [(272, "W", 2), (3201, "W", 2), (781, "Z", 1)])
def test_a_projected_step_that_raises_the_loss_is_halved_or_rejected(seed, which, halvings):
    """The rule the module adds to the paper: a projected step that raises F is halved until F
    does not rise (``max_halvings`` times), else the matrix is kept as it was."""
    X, Z, R, W, H = rule_problem(seed)
    start = {"Z": Z, "W": W}[which]
    # the case does exercise the rule: the full projected step raises F beyond rounding
    # (the reference halves it ``halvings`` times), and with no halving it is rejected
    rZ, rW, rH, rf, diag = ref_step(X, Z, R, W, H, **RULE)
    assert diag[which] == halvings
    G = ref_grads(X, Z, R, W, H, **RULE)[2] if which == "Z" else \
        ref_grads(X, rZ, R, W, H, **RULE)[0]

    def F(A):
        return ref_loss(X, A, R, W, H, **RULE) if which == "Z" else ref_loss(X, rZ, R, A, H, **RULE)

    t = parabola_min(lambda s: F(start - s * G), 1e-3)
    f0 = F(start)
    for j in range(halvings):
        assert F(np.maximum(start - t / 2 ** j * G, 0)) > f0 + 1e-6 * abs(f0)
    st, seen = recorded_iterates(X, Z, R, W, H, max_iter=1, tol=0, **RULE)
    for got, want in ((st.Z, rZ), (st.W, rW), (st.H, rH)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    got = {"Z": st.Z, "W": st.W}[which]
    np.testing.assert_allclose(got, np.maximum(start - t / 2 ** halvings * G, 0), rtol=1e-9, atol=1e-12)
    assert st.losses[1] == pytest.approx(rf, rel=1e-12)
    # no halving allowed: the step is rejected and the matrix is exactly the one it started from
    rZ0, rW0, rH0, rf0, diag0 = ref_step(X, Z, R, W, H, max_halvings=0, **RULE)
    assert diag0[which] is None
    st0 = sccase.iterate(X, Z, R, W, H, max_iter=1, tol=0, max_halvings=0, **RULE)
    np.testing.assert_array_equal({"Z": st0.Z, "W": st0.W}[which], start)
    for got, want in ((st0.Z, rZ0), (st0.W, rW0), (st0.H, rH0)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert st0.losses[1] == pytest.approx(rf0, rel=1e-12)
    assert st0.losses[1] == pytest.approx(ref_loss(X, st0.Z, R, st0.W, st0.H, **RULE), rel=1e-12)


def test_h_backtracking_accepts_the_first_step_that_does_not_raise_the_loss():
    """H's step: ``h_step`` shrunk by ``h_shrink`` until F does not rise, for at most
    ``max_backtracks`` tries; after that H is kept."""
    X, Z, R, W, H = rule_problem(272)
    kw = dict(RULE, h_step=50.0, h_shrink=0.2)
    rZ, rW, rH, rf, diag = ref_step(X, Z, R, W, H, max_backtracks=10, **kw)
    assert diag["H"] is not None and diag["H"] >= 2             # 50 and 10 both raise F here
    st = sccase.iterate(X, Z, R, W, H, max_iter=1, tol=0, max_backtracks=10, **kw)
    np.testing.assert_allclose(st.H, rH, rtol=1e-9, atol=1e-12)
    assert not np.array_equal(st.H, H) and st.losses[1] == pytest.approx(rf, rel=1e-12)
    # fewer tries than it needs: rejected, H is exactly the start, the loss is that of (Z1, W1, H)
    st = sccase.iterate(X, Z, R, W, H, max_iter=1, tol=0, max_backtracks=diag["H"], **kw)
    np.testing.assert_array_equal(st.H, H)
    np.testing.assert_allclose(st.W, rW, rtol=1e-9, atol=1e-12)
    assert st.losses[1] == pytest.approx(ref_loss(X, rZ, R, rW, H, **RULE), rel=1e-12)


def test_sccaser_reference_term_gradient_and_step():
    """Eq. (3)/(13): alpha |P - W1|^2 on W's first k1 columns (the masks M and N of Eq. 13)."""
    rng = np.random.default_rng(5)
    m, n, k, k1, alpha = 9, 7, 4, 2, 2.5
    X, Z, W, H = rng.random((m, n)), rng.random((n, n)), rng.random((m, k)), rng.random((k, n))
    R = (rng.random((n, n)) < 0.8).astype(float)
    Pm = rng.random((m, k1))
    kw = dict(lam=3.0, g1=0.5, g2=0.7, P=Pm, alpha=alpha)
    f = sccase.loss(X, Z, R, W, H, 3.0, 0.5, 0.7, P=Pm, alpha=alpha)
    assert f == pytest.approx(ref_loss(X, Z, R, W, H, **kw), rel=1e-12)
    G = sccase.grad_w(X, Z, R, W, H, 0.5, P=Pm, alpha=alpha)
    np.testing.assert_allclose(G, ref_grads(X, Z, R, W, H, **kw)[0], rtol=1e-12, atol=1e-12 * np.abs(G).max())
    num = np.zeros_like(W)
    for idx in np.ndindex(W.shape):
        e = np.zeros_like(W)
        e[idx] = 1e-6
        num[idx] = (ref_loss(X, Z, R, W + e, H, **kw) - ref_loss(X, Z, R, W - e, H, **kw)) / 2e-6
    np.testing.assert_allclose(G, num, rtol=1e-5, atol=1e-6 * np.abs(num).max())
    t = sccase.step_w(X, Z, R, W, H, G, 0.5, P=Pm, alpha=alpha)
    assert t == pytest.approx(parabola_min(lambda s: ref_loss(X, Z, R, W - s * G, H, **kw), 1e-3), rel=1e-7)
    # two iterations against the reference updates with the term, and every loss against Eq. (3)
    st, seen = recorded_iterates(X, Z, R, W, H, lam=3.0, g1=0.5, g2=0.7, max_iter=2, tol=0, P=Pm, alpha=alpha)
    ref_losses, rW, rH, rZ = ref_run(X, Z, R, W, H, 2, **kw)
    np.testing.assert_allclose(st.losses, ref_losses, rtol=1e-9)
    for got, want in ((st.W, rW), (st.H, rH), (st.Z, rZ)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
    np.testing.assert_allclose(st.losses, [ref_loss(X, Zi, R, Wi, Hi, **kw) for Wi, Hi, Zi in seen], rtol=1e-12)
    # without the term the same start goes elsewhere: the term is in the updates, not only the loss
    plain = sccase.iterate(X, Z, R, W, H, lam=3.0, g1=0.5, g2=0.7, max_iter=2, tol=0)
    assert not np.allclose(plain.W, st.W, rtol=1e-3)
    with pytest.raises(ValueError, match="reference projection"):
        sccase.iterate(X, Z, R, W, H, P=rng.random((m + 1, k1)), alpha=1.0)


def test_simplex_projection_against_a_brute_force_minimiser():
    from scipy.optimize import minimize

    rng = np.random.default_rng(2)
    A = rng.normal(size=(6, 4))
    P = sccase.simplex_columns(A)
    np.testing.assert_allclose(P.sum(0), 1, rtol=1e-12)
    np.testing.assert_allclose(sccase.simplex_columns(A.T, axis=1), P.T)
    for c in range(A.shape[1]):
        res = minimize(lambda x, c=c: np.sum((x - A[:, c]) ** 2), np.full(6, 1 / 6), method="SLSQP",
                       bounds=[(0, None)] * 6, constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
                       options={"ftol": 1e-14})
        np.testing.assert_allclose(P[:, c], res.x, atol=1e-6)
