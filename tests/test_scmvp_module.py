"""scMVP's networks and loss against direct NumPy/SciPy computations on a tiny model and
batch: the NB (Gamma-Poisson) and ZIP log-likelihoods, the mixture KL, the cycle KL, the
attention weights, the TF-IDF input, and the sparse path against the dense one."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import integrate, stats
from scipy.special import gammaln, logsumexp

from scatac_dist.modules.scmvp import SCMVPModule, SelfAttention, gaussian_kl, log_nb, log_zip
from scatac_dist.ops.tfidf import idf_from_counts, tfidf_block
from scatac_dist.train import SparseBatch

T = torch.float64


def test_log_nb_is_the_gamma_poisson_marginal():
    x = np.array([0, 1, 3, 10, 57], float)
    mean = np.array([0.5, 2.0, 3.0, 7.5, 40.0])
    theta = np.array([0.3, 1.0, 4.0, 2.5, 10.0])
    got = log_nb(torch.tensor(x, dtype=T), torch.tensor(mean, dtype=T), torch.tensor(theta, dtype=T)).numpy()
    # scipy's negative binomial with n = theta, p = theta / (theta + mean)
    np.testing.assert_allclose(got, stats.nbinom.logpmf(x, theta, theta / (theta + mean)), rtol=1e-6, atol=1e-6)
    # and the integral itself: Poisson(x | m) Gamma(m | shape theta, rate theta / mean) dm
    for xi, mi, ti in zip(x, mean, theta):
        f = lambda m, xi=xi, mi=mi, ti=ti: (stats.poisson.pmf(xi, m)  # noqa: E731
                                            * stats.gamma.pdf(m, ti, scale=mi / ti))
        val = sum(integrate.quad(f, a, b, limit=400)[0] for a, b in ((0, mi), (mi, 20 * mi + 200)))
        np.testing.assert_allclose(np.exp(got[list(x).index(xi)]), val, rtol=1e-4)


def test_log_zip_matches_the_mixture():
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 1, 2, 5, 0.7, 3.3])        # TF-IDF values are not integers
    mean = rng.uniform(0.1, 4, y.size)
    logits = rng.normal(0, 2, y.size)
    d = 1 / (1 + np.exp(-logits))                     # probability of a structural zero
    got = log_zip(torch.tensor(y, dtype=T), torch.tensor(mean, dtype=T), torch.tensor(logits, dtype=T)).numpy()
    pois = y * np.log(mean) - mean - gammaln(y + 1)   # Poisson log-pmf, extended to real y
    want = np.where(y > 0, np.log1p(-d) + pois, np.log(d + (1 - d) * np.exp(-mean)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    ints = y == np.round(y)
    np.testing.assert_allclose(np.exp(got[ints & (y > 0)]),
                               (1 - d[ints & (y > 0)]) * stats.poisson.pmf(y[ints & (y > 0)], mean[ints & (y > 0)]),
                               rtol=1e-6)
    # over the integers the probabilities sum to 1
    ks = torch.arange(0, 200, dtype=T)
    tot = log_zip(ks, torch.full_like(ks, 3.0), torch.full_like(ks, 0.4)).exp().sum()
    assert abs(float(tot) - 1) < 1e-7  # log(mean + 1e-8)


def test_gaussian_kl_closed_form():
    rng = np.random.default_rng(1)
    mq, lq, mp, lp = (rng.normal(size=(4, 6)) for _ in range(4))
    got = gaussian_kl(*(torch.tensor(a, dtype=T) for a in (mq, lq, mp, lp))).numpy()
    q = torch.distributions.Normal(torch.tensor(mq), torch.tensor(np.exp(lq / 2)))
    p = torch.distributions.Normal(torch.tensor(mp), torch.tensor(np.exp(lp / 2)))
    np.testing.assert_allclose(got, torch.distributions.kl_divergence(q, p).sum(-1).numpy(), rtol=1e-10)
    # by hand, one dimension: log(sp/sq) + (sq^2 + (mq - mp)^2) / (2 sp^2) - 1/2
    sq, sp_ = np.exp(lq / 2), np.exp(lp / 2)
    want = (np.log(sp_ / sq) + (sq ** 2 + (mq - mp) ** 2) / (2 * sp_ ** 2) - 0.5).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def _tiny(seed=0, G=7, P=11, K=3, **kw):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    idf = rng.uniform(1.5, 20, P)
    mod = SCMVPModule(G, P, K, idf, n_latent=4, width=16, heads=4, shared=8, **kw).double()
    with torch.no_grad():
        mod.prior.mu.normal_()
        mod.prior.var.uniform_(0.5, 2)
        mod.prior.logits.normal_()
    return mod, idf


def test_mixture_kl_is_the_expected_gaussian_kl_plus_the_categorical():
    """``KL(q(z, c|x) || p(z, c))`` with ``q(c|x) = gamma``: in closed form it is
    ``sum_c gamma_c [KL(N(mu, s^2) || N(mu_c, s_c^2)) + log gamma_c - log pi_c]``."""
    mod, _ = _tiny()
    rng = np.random.default_rng(2)
    mu, lv = rng.normal(size=(5, 4)), rng.normal(scale=0.5, size=(5, 4))
    z = mu + np.exp(lv / 2) * rng.normal(size=(5, 4))
    got = mod.prior.kl(torch.tensor(mu), torch.tensor(lv), torch.tensor(z)).detach().numpy()
    pm, pv = mod.prior.mu.detach().numpy(), mod.prior.var.detach().numpy()
    logpi = mod.prior.logits.detach().numpy() - logsumexp(mod.prior.logits.detach().numpy())
    # gamma = p(c | z) with SCALE's (the authors') floor: 1e-10 added to every p(z, c)
    lj = logpi + stats.norm.logpdf(z[:, None, :], pm[None], np.sqrt(pv)[None]).sum(-1)
    pzc = np.exp(lj) + 1e-10
    gamma = pzc / pzc.sum(1, keepdims=True)
    kl_c = 0.5 * (np.log(pv)[None] - lv[:, None] + (np.exp(lv)[:, None] + (mu[:, None] - pm[None]) ** 2) / pv[None]
                  - 1).sum(-1)
    want = (gamma * (kl_c + np.log(gamma) - logpi)).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_self_attention_matches_the_formula_and_weights_sum_to_one():
    torch.manual_seed(3)
    att = SelfAttention(16, 4).double()
    h = torch.randn(5, 16, dtype=T)
    out, w = att(h)
    np.testing.assert_allclose(w.sum(-1).detach().numpy(), 1.0, rtol=1e-12)
    W = {k: (getattr(att, k).weight.detach().numpy(), getattr(att, k).bias.detach().numpy()) for k in "qkv"}
    Wo, bo = att.out.weight.detach().numpy(), att.out.bias.detach().numpy()
    H = h.numpy()
    heads = []
    q, k, v = ((H @ W[n][0].T + W[n][1]).reshape(5, 4, 4) for n in "qkv")  # 4 heads of d = 4
    for i in range(4):
        s = q[:, i, :, None] * k[:, i, None, :] / np.sqrt(4)                # d x d: feature-tokens
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        heads.append((a @ v[:, i, :, None])[..., 0])
    want = np.concatenate(heads, 1) @ Wo.T + bo
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-10)


def test_mask_and_cluster_attentions_sum_to_one():
    mod, _ = _tiny()
    x = torch.rand(6, 7, dtype=T) * 5
    a = mod.rna_enc.attention(torch.log1p(x))
    np.testing.assert_allclose(a.sum(1).detach().numpy(), 1.0, rtol=1e-12)
    gamma = mod.prior.responsibilities(torch.randn(6, 4, dtype=T))
    for lin in (mod.cluster_rna, mod.cluster_atac):
        np.testing.assert_allclose(torch.softmax(lin(gamma), -1).sum(1).detach().numpy(), 1.0, rtol=1e-12)


def _batch(G=7, P=11, n=6, seed=4):
    rng = np.random.default_rng(seed)
    rna = sp.random(n, G, density=0.5, format="csr", random_state=rng)
    rna.data = np.ceil(rna.data * 9)
    atac = sp.random(n, P, density=0.4, format="csr", random_state=rng)
    atac.data[:] = 1
    m = sp.hstack([rna, atac], format="csr")
    m.sort_indices()
    return m, rna, atac


def test_tfidf_input_is_signac_method_1_and_sparse_equals_dense():
    mod, idf = _tiny()
    m, rna, atac = _batch()
    b = SparseBatch.from_csr(m, np.arange(m.shape[0])).to_device("cpu")
    dense = mod.split(b["x"].double())
    want = tfidf_block(atac, idf, "signac1", 1e4, dtype=np.float64).toarray()
    np.testing.assert_allclose(dense["y"].numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(dense["lib"].numpy(), np.asarray(rna.sum(1)).ravel())
    # Signac's IDF is n / df: what SCMVP computes from the cells' detections
    np.testing.assert_allclose(idf_from_counts(np.array([2, 5]), 10, "signac1"), [5.0, 2.0])
    sparse = mod.split(None, b["cols"], b["offsets"], b["values"])
    mod.eval()
    with torch.no_grad():
        a = mod.encode(sparse)
        d = mod.encode({"x": dense["x"], "y": dense["y"]})
    for u, v in zip(a, d):
        np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-9, atol=1e-10)


def test_the_loss_is_the_sum_of_its_terms_and_the_cycle_kl_is_computed_as_stated():
    mod, _ = _tiny()
    mod.eval()
    m, _, _ = _batch()
    b = SparseBatch.from_csr(m, np.arange(m.shape[0])).to_device("cpu")
    views = mod.split(b["x"].double())
    noise = torch.randn(m.shape[0], 4, dtype=T)
    with torch.no_grad():
        t = mod.loss_terms(views, noise=noise.float())
        mu, lv = mod.encode(views)
        z = mu + torch.exp(0.5 * lv) * noise
        out = mod.decode(z, views["lib"])
        cyc = sum(gaussian_kl(mu, lv, *enc) for enc in (
            mod.rna_single(torch.log1p(out["rna_mean"])), mod.atac_single(out["atac_mean"]),
            mod.rna_single(torch.log1p(views["x"])), mod.atac_single(views["y"])))
        rec_x = -stats.nbinom.logpmf(views["x"].numpy(), out["theta"].numpy(),
                                     out["theta"].numpy() / (out["theta"].numpy() + out["rna_mean"].numpy())).sum(1)
        loss = mod(b["x"].double(), noise=noise.float())
    np.testing.assert_allclose(t["cycle"].numpy(), cyc.numpy(), rtol=1e-6)
    np.testing.assert_allclose(t["recon_rna"].numpy(), rec_x, rtol=1e-5)
    total = (t["recon_rna"] + t["recon_atac"] + t["kl"] + t["cycle"]).mean()
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-6)
    # the NB means are the cell's UMIs spread over the genes
    np.testing.assert_allclose(out["rna_mean"].sum(1).numpy(), views["lib"].numpy(), rtol=1e-6)
    weighted, _ = _tiny(rna_weight=3.0, atac_weight=0.1)  # the same weights (same seed), the authors' code's weighting
    weighted.eval()
    with torch.no_grad():
        np.testing.assert_allclose(float(weighted(b["x"].double(), noise=noise.float())),
                                   float((3 * t["recon_rna"] + 0.1 * t["recon_atac"] + t["kl"] + t["cycle"]).mean()),
                                   rtol=1e-6)
    no_cycle, _ = _tiny(cycle=False)
    assert float(no_cycle.loss_terms(no_cycle.split(b["x"].double()), noise=noise.float())["cycle"].abs().sum()) == 0


def test_a_width_that_heads_do_not_divide_is_refused():
    with pytest.raises(ValueError, match="multiple of heads"):
        SelfAttention(10, 4)


def test_bf16_autocast_keeps_the_likelihoods_in_float32():
    """What GPU training runs (bf16 autocast): the loss comes out float32, finite, close to the
    float32 loss, and every gradient is finite. Checked with CPU autocast (no GPU in CI)."""
    torch.manual_seed(0)
    m, _, _ = _batch(G=30, P=60, n=32)
    b = SparseBatch.from_csr(m, np.arange(m.shape[0])).to_device("cpu")
    mod = SCMVPModule(30, 60, 4, np.full(60, 8.0, np.float32), rna_weight=3.0, atac_weight=0.1)
    mod.eval()
    noise = torch.randn(32, 10)
    with torch.no_grad():
        ref = float(mod(**b, noise=noise))
    mod.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mod(**b, noise=noise)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters() if p.grad is not None)
    mod.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert abs(float(mod(**b, noise=noise)) - ref) / abs(ref) < 0.05
