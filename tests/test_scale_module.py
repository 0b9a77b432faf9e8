"""SCALE's network and loss against a direct NumPy computation, and its output kernels
(feature-associated peaks, Jensen-Shannon specificity, binarisation) against the paper's
definitions written out by hand."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from scatac_dist.models.scale import binarize_imputed, feature_peaks, js_specificity
from scatac_dist.modules.scale import SCALEModule


def _np_forward(m: SCALEModule, x: np.ndarray, eps: np.ndarray) -> dict:
    """Eq. (1)-(7) of the paper with the authors' q(c|x) = p(c|z), in float64 NumPy."""
    P = {k: v.detach().double().numpy() for k, v in m.state_dict().items()}
    h = np.maximum(x @ P["encoder.first.weight"] + P["encoder.first.bias"], 0)  # stored input-major
    for i in range(1, len(m.hidden_sizes)):
        h = np.maximum(h @ P[f"encoder.hidden.{2 * i - 1}.weight"].T + P[f"encoder.hidden.{2 * i - 1}.bias"], 0)
    mu = h @ P["encoder.mu.weight"].T + P["encoder.mu.bias"]
    logvar = h @ P["encoder.logvar.weight"].T + P["encoder.logvar.bias"]
    z = mu + np.exp(logvar / 2) * eps
    logits = z @ P["decoder.weight"].T + P["decoder.bias"]
    px = 1 / (1 + np.exp(-logits))
    recon = -(x * np.log(px) + (1 - x) * np.log(1 - px)).sum(1)
    pi = np.exp(P["prior.logits"]) / np.exp(P["prior.logits"]).sum()
    mc, vc = P["prior.mu"], np.maximum(P["prior.var"], 1e-8)  # K x D, raw variances as the authors keep them
    n, K = x.shape[0], len(pi)
    log_pzc = np.zeros((n, K))
    for c in range(K):
        log_pzc[:, c] = np.log(pi[c]) + (-0.5 * np.log(2 * math.pi * vc[c]) - (z - mc[c]) ** 2 / (2 * vc[c])).sum(1)
    gamma = np.exp(log_pzc) + 1e-10  # the authors' get_gamma: p(z, c) + 1e-10, normalised
    gamma /= gamma.sum(1, keepdims=True)
    # KL(q(z,c|x) || p(z,c)) = E_q[log q(z|x) + log q(c|x) - log p(z|c) - log p(c)]
    e_log_pz_c = np.zeros(n)
    for c in range(K):
        e_log_pz_c += gamma[:, c] * (-0.5 * (np.log(2 * math.pi * vc[c]) + (np.exp(logvar) + (mu - mc[c]) ** 2)
                                             / vc[c]).sum(1))
    e_log_pc = (gamma * np.log(pi)).sum(1)
    e_log_qz = -0.5 * (1 + np.log(2 * math.pi) + logvar).sum(1)
    e_log_qc = (gamma * np.log(gamma)).sum(1)
    kl = e_log_qz + e_log_qc - e_log_pz_c - e_log_pc
    return {"recon": recon, "kl": kl, "gamma": gamma, "mu": mu}


def test_elbo_terms_match_numpy():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    m = SCALEModule(n_input=40, n_components=3, hidden=(16, 8), n_latent=4).double()
    with torch.no_grad():  # a prior away from its zero start, so every term matters
        m.prior.logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
        m.prior.mu.normal_()
        m.prior.var.uniform_(0.6, 1.6)
    x = (rng.random((7, 40)) < 0.3).astype(float)
    eps = rng.standard_normal((7, 4))
    got = m.loss_terms(torch.tensor(x), noise=torch.tensor(eps))
    ref = _np_forward(m, x, eps)
    for key in ("recon", "kl", "gamma", "mu"):
        np.testing.assert_allclose(got[key].detach().numpy(), ref[key], rtol=1e-6, atol=1e-9, err_msg=key)
    loss = m(torch.tensor(x), noise=torch.tensor(eps))
    np.testing.assert_allclose(float(loss.detach()), (ref["recon"] + ref["kl"]).mean(), rtol=1e-6)
    # the sparse first layer (CSR pieces through embedding_bag) gives the same loss and gradients
    from scatac_dist.train.data import SparseBatch

    xs = SparseBatch.from_csr(sp.csr_matrix(x.astype(np.float32)), np.arange(7)).to_device("cpu")
    m = m.float()
    dense = m(xs["x"], noise=torch.tensor(eps, dtype=torch.float32))
    gd = torch.autograd.grad(dense, list(m.parameters()))
    sparse = m(**xs, noise=torch.tensor(eps, dtype=torch.float32))
    gs = torch.autograd.grad(sparse, list(m.parameters()))
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-4)
    for a, b in zip(gd, gs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_responsibilities_floor_like_the_authors():
    """gamma = (p(z, c) + 1e-10) / sum: a cell near a component goes to it; a cell far from every
    component gets a flat gamma (an exact p(c|z) would give it all to the widest component),
    so every component's mean is pulled towards it."""
    m = SCALEModule(n_input=5, n_components=3, hidden=(4,), n_latent=2).double()
    with torch.no_grad():
        m.prior.mu.copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]))
        m.prior.var.copy_(torch.tensor([[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]))
    z = torch.tensor([[0.1, -0.1], [40.0, -40.0]], requires_grad=True)
    gamma = m.prior.responsibilities(z)
    mu, var, pi = m.prior.mu.detach().numpy(), m.prior.var.detach().numpy(), np.full(3, 1 / 3)
    p = np.stack([pi[c] * np.prod(np.exp(-(z.detach().numpy() - mu[c]) ** 2 / (2 * var[c]))
                                  / np.sqrt(2 * math.pi * var[c]), axis=1) for c in range(3)], 1) + 1e-10
    np.testing.assert_allclose(gamma.detach().numpy(), p / p.sum(1, keepdims=True), rtol=1e-9)
    assert gamma[0, 0] > 0.9
    np.testing.assert_allclose(gamma[1].detach().numpy(), np.full(3, 1 / 3), atol=1e-9)
    assert m.prior.log_joint(z)[1].argmax() == 2  # the exact posterior still prefers the widest
    loss = m.prior.log_joint(z)[1:].mul(gamma[1:].detach()).sum().neg()
    (grad,) = torch.autograd.grad(loss, m.prior.mu)
    assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all()  # all three means move towards the cell


def test_generator_noise_is_reproducible():
    m = SCALEModule(n_input=20, n_components=2, hidden=(8,), n_latent=3)
    x = torch.bernoulli(torch.full((5, 20), 0.4), generator=torch.Generator().manual_seed(1))
    a = m(x, generator=torch.Generator().manual_seed(7))
    b = m(x, generator=torch.Generator().manual_seed(7))
    c = m(x, generator=torch.Generator().manual_seed(8))
    assert float(a) == float(b) and float(a) != float(c)


def test_feature_peaks_are_beyond_2_5_sd():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((5000, 3))
    W[:10, 1] = 8.0  # ten planted outliers in feature 1
    fp = feature_peaks(W)
    assert fp[:10, 1].all()
    for d in range(3):
        z = np.abs(W[:, d] - W[:, d].mean()) / W[:, d].std()
        np.testing.assert_array_equal(fp[:, d], z > 2.5)


def test_js_specificity_by_hand():
    M = np.array([[1.0, 0.0, 0.0],     # open in cluster 0 only: score 1
                  [1.0, 1.0, 1.0],     # uniform: lowest
                  [0.2, 0.6, 0.2]])
    score, best = js_specificity(M)
    assert best[0] == 0 and np.isclose(score[0], 1.0)
    assert best[2] == 1
    # by hand for the last peak, in bits
    p = np.array([0.2, 0.6, 0.2])
    q = np.array([0.0, 1.0, 0.0])
    mid = (p + q) / 2

    def H(a):
        a = a[a > 0]
        return -(a * np.log2(a)).sum()

    js = H(mid) - (H(p) + H(q)) / 2
    assert np.isclose(score[2], 1 - np.sqrt(js))
    assert score[1] < score[2] < score[0]


def test_binarisation_rule():
    P = np.array([[0.5, 0.1], [0.3, 0.9]])
    peak_mean = np.array([0.4, 0.2])   # per peak, over cells
    cell_mean = np.array([0.2, 0.35])  # per cell, over peaks
    np.testing.assert_array_equal(binarize_imputed(P, peak_mean, cell_mean), [[True, False], [False, True]])


def test_sparse_first_layer_gradient_is_x_transpose_times_grad():
    """The first layer's own backward (``X^T @ dY`` as a sum over X's transpose) against the
    dense product, with an empty cell, peaks open in no cell and non-unit values."""
    from scatac_dist.modules.scale import SparseInputLinear
    from scatac_dist.train.data import SparseBatch

    rng = np.random.default_rng(3)
    x = (rng.random((9, 50)) < 0.2) * rng.integers(1, 4, (9, 50))
    x[4] = 0
    x[:, :5] = 0
    x = x.astype(np.float32)
    layer = SparseInputLinear(50, 6)
    torch.nn.init.normal_(layer.weight)
    b = SparseBatch.from_csr(sp.csr_matrix(x), np.arange(9)).to_device("cpu")
    dy = torch.randn(9, 6)
    out = layer(cols=b["cols"], offsets=b["offsets"], values=b["values"])
    (gw, gb) = torch.autograd.grad(out, [layer.weight, layer.bias], dy)
    torch.testing.assert_close(out, torch.from_numpy(x) @ layer.weight.detach() + layer.bias.detach())
    torch.testing.assert_close(gw, torch.from_numpy(x).T @ dy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, dy.sum(0))
    assert float(gw[:5].abs().sum()) == 0.0


def test_retain_freed_memory_keeps_pages_then_gives_them_back():
    """Inside the block a freed 256 MiB buffer stays resident (the next step reuses it);
    on leaving, the heap is trimmed and the memory goes back to the system."""
    import sys

    import pytest

    from scatac_dist.train.alloc import glibc, retain_freed_memory

    if not sys.platform.startswith("linux") or glibc() is None:
        pytest.skip("glibc only: elsewhere retain_freed_memory does nothing by design")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    size = 256 * 2**20
    with retain_freed_memory():
        before = rss()
        buf = torch.ones(size // 4)
        del buf
        kept = rss() - before
    after = rss() - before
    buf = torch.ones(size // 4)  # outside the block glibc maps and unmaps it
    del buf
    outside = rss() - before
    assert kept > 0.9 * size, kept
    assert after < 0.1 * size, after
    assert outside < 0.1 * size, outside


def test_state_with_log_variances_loads_as_raw_variances():
    """Models saved before the mixture's variances were stored raw still load, unchanged."""
    torch.manual_seed(1)
    m = SCALEModule(n_input=12, n_components=3, hidden=(8,), n_latent=2)
    with torch.no_grad():
        m.prior.var.uniform_(0.2, 3.0)
    old = m.state_dict()
    old["prior.log_var"] = old.pop("prior.var").log()
    fresh = SCALEModule(n_input=12, n_components=3, hidden=(8,), n_latent=2)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.prior.var, m.prior.var)
    x = (torch.rand(5, 12) < 0.4).float()
    eps = torch.randn(5, 2)
    torch.testing.assert_close(fresh(x, noise=eps), m(x, noise=eps))


def test_depth_normalised_encoder_input_matches_numpy():
    """``input_scale``: the encoder sees each cell's input divided by its total and multiplied by
    the scale, on the CSR path and the dense path alike; an empty cell stays empty, and a cell
    with every value tripled encodes the same."""
    from scatac_dist.train.data import SparseBatch

    rng = np.random.default_rng(5)
    x = ((rng.random((8, 40)) < 0.3) * rng.integers(1, 3, (8, 40))).astype(np.float32)
    x[3] = 0
    x[6] = 3 * x[5]
    torch.manual_seed(0)
    m = SCALEModule(40, 3, (12, 6), 4, input_scale=5.0)
    b = SparseBatch.from_csr(sp.csr_matrix(x), np.arange(8)).to_device("cpu")
    sparse_mu, _ = m.encoder(cols=b["cols"], offsets=b["offsets"], values=b["values"])
    dense_mu, _ = m.encoder(torch.from_numpy(x))
    tot = x.sum(1, keepdims=True)
    xn = np.divide(x * 5.0, tot, out=np.zeros_like(x), where=tot > 0)
    with torch.no_grad():
        ref = m.encoder.mu(m.encoder.hidden(m.encoder.first(torch.from_numpy(xn))))
    torch.testing.assert_close(sparse_mu.detach(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_mu.detach(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_mu[6].detach(), sparse_mu[5].detach(), rtol=1e-5, atol=1e-5)
    plain = SCALEModule(40, 3, (12, 6), 4)
    plain.load_state_dict(m.state_dict())
    assert not torch.allclose(plain.encoder(torch.from_numpy(x))[0][6], plain.encoder(torch.from_numpy(x))[0][5])


def test_decoder_depth_offset_matches_numpy():
    """``depth_ref``: the reconstruction term uses logits ``W z + b + log(open_i / depth_ref)``,
    with ``open_i`` the cell's open peaks (an empty cell counts as 1); the KL terms are unchanged."""
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    m = SCALEModule(n_input=30, n_components=3, hidden=(12,), n_latent=4, depth_ref=6.0).double()
    x = (rng.random((6, 30)) < 0.3).astype(float)
    x[2] = 0
    x[4] = 1
    eps = rng.standard_normal((6, 4))
    got = m.loss_terms(torch.tensor(x), noise=torch.tensor(eps))
    P = {k: v.detach().double().numpy() for k, v in m.state_dict().items()}
    h = np.maximum(x @ P["encoder.first.weight"] + P["encoder.first.bias"], 0)
    z = h @ P["encoder.mu.weight"].T + P["encoder.mu.bias"] + np.exp(
        (h @ P["encoder.logvar.weight"].T + P["encoder.logvar.bias"]) / 2) * eps
    logits = z @ P["decoder.weight"].T + P["decoder.bias"] + np.log(np.maximum(x.sum(1, keepdims=True), 1) / 6.0)
    recon = np.logaddexp(0, logits).sum(1) - (x * logits).sum(1)  # -log Ber(x | sigmoid(logits))
    np.testing.assert_allclose(got["recon"].detach().numpy(), recon, rtol=1e-6)
    plain = SCALEModule(n_input=30, n_components=3, hidden=(12,), n_latent=4).double()
    plain.load_state_dict(m.state_dict())
    ref = plain.loss_terms(torch.tensor(x), noise=torch.tensor(eps))
    torch.testing.assert_close(got["kl"], ref["kl"])
    assert not np.allclose(ref["recon"].detach().numpy(), recon)
    assert SCALEModule(**m.config()).depth_ref == 6.0  # saved models rebuild it from their config
    # the training path (CSR pieces alongside x) counts the open peaks from the row lengths
    from scatac_dist.train.data import SparseBatch

    m = m.float()
    xs = SparseBatch.from_csr(sp.csr_matrix(x.astype(np.float32)), np.arange(6)).to_device("cpu")
    e = torch.tensor(eps, dtype=torch.float32)
    dense = m(xs["x"], noise=e)
    sparse = m(**xs, noise=e)
    torch.testing.assert_close(sparse, dense)
    for a, b in zip(torch.autograd.grad(dense, list(m.parameters())), torch.autograd.grad(sparse, list(m.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(dense), (recon + ref["kl"].detach().numpy()).mean(), rtol=1e-5)
