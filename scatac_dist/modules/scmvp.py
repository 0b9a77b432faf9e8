"""scMVP's networks (Li et al., Genome Biology 2022, Methods): a multi-view VAE with a
Gaussian-mixture prior over a common latent ``z`` of RNA counts ``x`` and TF-IDF ATAC ``y``.

Generative model (paper Eq. 1-9)::

    c ~ Cat(pi),  z | c ~ N(mu_c, sigma_c^2 I)
    x | z ~ NB(mean = l_x * rho_x(z, c), dispersion theta)          (Gamma-Poisson)
    y | z ~ ZIP(mean mu_y(z, c), dropout d_y(z, c))                   (zero-inflated Poisson)

Inference: ``q(z | x, y)`` from a two-channel encoder (a mask-attention RNA branch and an
8-head self-attention ATAC branch, 128 each, a shared 256 layer, then 128-wide heads for
the mean and the log-variance). Loss per cell (to minimise; paper Eq. 16)::

    - log p(x | z) - log p(y | z) + KL_GMM(q(z|x,y) || p(z, c))
    + KL(q(z|x,y) || q(z|x_imp)) + KL(q(z|x,y) || q(z|y_imp))          (cycle consistency)
    + KL(q(z|x,y) || q(z|x))     + KL(q(z|x,y) || q(z|y))              (raw data, same encoders)

(:meth:`SCMVPModule.forward` can weight the two likelihoods, as the authors' code does.)

``KL_GMM`` is SCALE's mixture KL with ``q(c|z) = p(c|z)`` (:meth:`GMMPrior.kl`). The
decoder's last hidden layer of each channel is weighted by the cluster-guided attention
``softmax(MLP(p(c|z)))``. Every attention here is a softmax whose weights sum to 1; a
weighted layer is multiplied by its width, so uniform attention leaves it unchanged.

The batch arrives as one matrix whose first ``n_genes`` columns are RNA counts and the rest
binarised ATAC (:class:`scatac_dist.train.JointRows`); ATAC's TF-IDF is computed here, per
batch, from a per-peak IDF fixed before training. No store slots: the model class
(:class:`scatac_dist.models.SCMVP`) reads the data and writes the results. Where this follows
or departs from the authors' code, and why: ``docs/methods/scmvp.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .scale import GMMPrior, SparseInputLinear

__all__ = ["SCMVPModule", "MaskAttentionEncoder", "SelfAttentionEncoder", "SelfAttention",
           "log_nb", "log_zip", "gaussian_kl"]

EPS = 1e-8


def log_nb(x: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``log NB(x; mean, theta)``, the Gamma-Poisson marginal: ``x ~ Poisson(m)``,
    ``m ~ Gamma(shape theta, rate theta / mean)``. Elementwise."""
    log_t_m = torch.log(theta + mean + EPS)
    return (theta * (torch.log(theta + EPS) - log_t_m) + x * (torch.log(mean + EPS) - log_t_m)
            + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))


def log_zip(y: torch.Tensor, mean: torch.Tensor, dropout_logits: torch.Tensor) -> torch.Tensor:
    """``log ZIP(y; mean, d)`` with ``d = sigmoid(dropout_logits)`` the probability of a
    structural zero (the paper's ``1 - tau_y``); ``y`` may be non-integer (TF-IDF), the
    Poisson part then uses ``lgamma(y + 1)``. Elementwise."""
    log_keep = -F.softplus(dropout_logits)                 # log(1 - d)
    log_pois = y * torch.log(mean + EPS) - mean - torch.lgamma(y + 1)
    zero = torch.logaddexp(-F.softplus(-dropout_logits), log_keep - mean)  # log(d + (1 - d) e^-mean)
    return torch.where(y > 0, log_keep + log_pois, zero)


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p))`` of diagonal Gaussians, summed over
    the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(-1)


def _weighted(h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``h * softmax(logits) * width``: an attention over ``h``'s features."""
    return h * torch.softmax(logits, dim=-1) * h.shape[-1]


class SelfAttention(nn.Module):
    """Multi-head self-attention over one cell's hidden vector (paper Eq. 11-12).

    The ``width`` features are split into ``heads`` heads of ``width / heads``; within a head
    each feature is a token (the authors' reading: a cell has no sequence of its own), its
    query, key and value the head's slice of ``W^Q h``, ``W^K h``, ``W^V h``. Attention is
    ``softmax(q k^T / sqrt(d_k))`` with ``d_k`` the head width; heads are concatenated and
    projected by ``W^O``. Returns the output and the attention weights (cells x heads x d x d).
    """

    def __init__(self, width: int = 128, heads: int = 8):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads, self.d = heads, width // heads
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        q = self.q(h).view(n, self.heads, self.d, 1)
        k = self.k(h).view(n, self.heads, self.d, 1)
        v = self.v(h).view(n, self.heads, self.d, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d), dim=-1)
        return self.out((att @ v).reshape(n, -1)), att


class MaskAttentionEncoder(nn.Module):
    """The RNA branch: ``h1 = W x``; ``ReLU(BN(LN(h1)))`` weighted by ``softmax(W' h1)``, the
    mask attention generated from the first hidden layer. Input: ``log1p`` counts (dense, or
    CSR pieces for the first layer)."""

    def __init__(self, n_input: int, width: int = 128):
        super().__init__()
        self.first = SparseInputLinear(n_input, width)
        self.ln, self.bn = nn.LayerNorm(width), nn.BatchNorm1d(width)
        self.mask = nn.Linear(width, width)

    def forward(self, x=None, cols=None, offsets=None, values=None) -> torch.Tensor:
        h1 = self.first(x, cols, offsets, values)
        return _weighted(F.relu(self.bn(self.ln(h1))), self.mask(h1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The mask attention weights (cells x width) for dense input ``x``."""
        return torch.softmax(self.mask(self.first(x)), dim=-1)


class SelfAttentionEncoder(nn.Module):
    """The ATAC branch: ``h = ReLU(BN(W y))``, then ``LN(h + MultiHead(h))``."""

    def __init__(self, n_input: int, width: int = 128, heads: int = 8):
        super().__init__()
        self.first = SparseInputLinear(n_input, width)
        self.bn, self.ln = nn.BatchNorm1d(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)

    def forward(self, y=None, cols=None, offsets=None, values=None) -> torch.Tensor:
        h = F.relu(self.bn(self.first(y, cols, offsets, values)))
        return self.ln(h + self.attn(h)[0])


class _Heads(nn.Module):
    """``h -> (mean, logvar)`` through 128-wide layers (the paper's "two cascaded 128 layers")."""

    def __init__(self, n_in: int, n_latent: int, width: int = 128):
        super().__init__()
        self.mean = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, n_latent))
        self.logvar = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, n_latent))

    def forward(self, h):
        return self.mean(h), self.logvar(h).clamp(-12.0, 8.0)


class _Single(nn.Module):
    """A single-channel encoder of the cycle (same structure as its branch): ``q(z | x)`` or ``q(z | y)``."""

    def __init__(self, branch: nn.Module, width: int, n_latent: int):
        super().__init__()
        self.branch, self.heads = branch, _Heads(width, n_latent, width)

    def forward(self, *args, **kw):
        return self.heads(self.branch(*args, **kw))


class SCMVPModule(nn.Module):
    """scMVP's VAE (see the module docstring).

    Parameters
    ----------
    n_genes, n_peaks
        Input widths; a batch's columns are genes first, then peaks.
    n_components
        Mixture components ``K``.
    idf
        Per-peak IDF of the TF-IDF (``n_peaks``), stored as a buffer.
    n_latent, width, heads, shared
        Latent size (10), branch width (128), attention heads (8), shared layer (256).
    tfidf_scale
        ``s`` of Signac's ``log(1 + s * tf * idf)`` (1e4).
    cycle
        Add the cycle-consistency (and raw single-channel) KL terms.
    detach_target
        The joint posterior is a fixed target in those KL terms (no gradient through it).
    rna_input, rna_scale
        The RNA encoders' input: ``"log1p"`` counts (default) or ``"lognorm"``,
        ``log1p(counts per rna_scale)``.
    rna_weight, atac_weight
        Weights of the two negative log-likelihoods in :meth:`forward` (1, 1: the paper's equation).
    kl_warmup
        Steps over which the mixture KL's weight rises linearly to 1 (0: none).
    """

    def __init__(self, n_genes: int, n_peaks: int, n_components: int, idf=None, *, n_latent: int = 10,
                 width: int = 128, heads: int = 8, shared: int = 256, tfidf_scale: float = 1e4, cycle: bool = True,
                 detach_target: bool = True, rna_input: str = "log1p", rna_scale: float = 1e4,
                 rna_weight: float = 1.0, atac_weight: float = 1.0, kl_warmup: int = 0):
        super().__init__()
        self.n_genes, self.n_peaks, self.n_components = int(n_genes), int(n_peaks), int(n_components)
        self.n_latent, self.width, self.heads, self.shared_width = int(n_latent), int(width), int(heads), int(shared)
        self.tfidf_scale, self.cycle, self.detach_target = float(tfidf_scale), bool(cycle), bool(detach_target)
        if rna_input not in ("log1p", "lognorm"):
            raise ValueError(f"rna_input={rna_input!r}; use 'log1p' or 'lognorm'")
        self.rna_input, self.rna_scale = rna_input, float(rna_scale)
        self.rna_weight, self.atac_weight, self.kl_warmup = float(rna_weight), float(atac_weight), int(kl_warmup)
        self.register_buffer("idf", torch.ones(self.n_peaks) if idf is None
                             else torch.as_tensor(idf, dtype=torch.float32).clone())
        # q(z | x, y)
        self.rna_enc = MaskAttentionEncoder(n_genes, width)
        self.atac_enc = SelfAttentionEncoder(n_peaks, width, heads)
        self.shared = nn.Sequential(nn.Linear(2 * width, shared), nn.ReLU())
        self.heads_joint = _Heads(shared, n_latent, width)
        # cycle: q(z | x), q(z | y)
        self.rna_single = _Single(MaskAttentionEncoder(n_genes, width), width, n_latent)
        self.atac_single = _Single(SelfAttentionEncoder(n_peaks, width, heads), width, n_latent)
        # p(x | z, c), p(y | z, c)
        self.cluster_rna = nn.Linear(n_components, width)
        self.cluster_atac = nn.Linear(n_components, width)
        self.dec_rna_h, self.dec_rna_mask = nn.Linear(n_latent, width), nn.Linear(n_latent, width)
        self.dec_rna_ln, self.dec_rna_bn = nn.LayerNorm(width), nn.BatchNorm1d(width)
        self.dec_rna_out = nn.Linear(width, n_genes)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))
        self.dec_atac_h, self.dec_atac_bn = nn.Linear(n_latent, width), nn.BatchNorm1d(width)
        self.dec_atac_attn, self.dec_atac_ln = SelfAttention(width, heads), nn.LayerNorm(width)
        self.dec_atac_mean, self.dec_atac_drop = nn.Linear(width, n_peaks), nn.Linear(width, n_peaks)
        self.prior = GMMPrior(n_components, n_latent)
        for m in self.modules():
            if isinstance(m, (nn.Linear, SparseInputLinear)):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def config(self) -> dict:
        return {"n_genes": self.n_genes, "n_peaks": self.n_peaks, "n_components": self.n_components,
                "n_latent": self.n_latent, "width": self.width, "heads": self.heads, "shared": self.shared_width,
                "tfidf_scale": self.tfidf_scale, "cycle": self.cycle,
                "detach_target": self.detach_target, "rna_input": self.rna_input, "rna_scale": self.rna_scale,
                "rna_weight": self.rna_weight, "atac_weight": self.atac_weight, "kl_warmup": self.kl_warmup}

    # -- inputs ----------------------------------------------------------------------------

    def split(self, x: torch.Tensor | None = None, cols=None, offsets=None, values=None) -> dict:
        """The batch's two views: RNA counts and library (``x``, ``lib``), binary ATAC as
        dense TF-IDF ``y``, and each view's encoder input as CSR pieces when given
        (``rna_sparse``: log1p counts, ``atac_sparse``: TF-IDF)."""
        G, dt = self.n_genes, self.idf.dtype
        out = {}
        if x is not None:
            xr, xa = x[:, :G].to(dt), x[:, G:].to(dt)
            out["x"], out["lib"] = xr, xr.sum(1)
            out["y"] = self._tfidf_dense(xa)
        if cols is not None:
            n = offsets.numel()
            lengths = torch.diff(offsets, append=offsets.new_tensor([cols.numel()]))
            rows = torch.repeat_interleave(torch.arange(n, device=cols.device), lengths)
            is_rna = cols < G
            rr, vr = rows[is_rna], values[is_rna].to(dt)
            lib = torch.zeros(n, device=vr.device, dtype=dt).index_add_(0, rr, vr)
            out["rna_sparse"] = self._pieces(rr, cols[is_rna], self._rna_values(vr, lib[rr]), n)
            ra, ca, va = rows[~is_rna], cols[~is_rna] - G, values[~is_rna].to(dt)
            totals = torch.zeros(n, device=va.device, dtype=dt).index_add_(0, ra, va)
            tf = va / totals.clamp_min(1e-12)[ra]
            out["atac_sparse"] = self._pieces(ra, ca, torch.log1p(self.tfidf_scale * tf * self.idf[ca]), n)
            if x is None:
                out["lib"] = lib
        return out

    @staticmethod
    def _pieces(rows, cols, vals, n):
        counts = torch.bincount(rows, minlength=n)
        return {"cols": cols, "offsets": torch.cumsum(counts, 0) - counts, "values": vals}

    def _rna_values(self, v: torch.Tensor, lib: torch.Tensor) -> torch.Tensor:
        """The RNA encoder's input: ``log1p`` of the counts, or (``rna_input="lognorm"``) of the
        counts per ``rna_scale`` UMIs."""
        if self.rna_input == "lognorm":
            return torch.log1p(v * (self.rna_scale / lib.clamp_min(1e-12)))
        return torch.log1p(v)

    def rna_in(self, x: torch.Tensor) -> torch.Tensor:
        """The RNA encoder's input of dense counts (cells x genes)."""
        return self._rna_values(x, x.sum(1, keepdim=True))

    def _tfidf_dense(self, xa: torch.Tensor) -> torch.Tensor:
        tf = xa / xa.sum(1, keepdim=True).clamp_min(1e-12)
        return torch.log1p(self.tfidf_scale * tf * self.idf)

    # -- the networks ----------------------------------------------------------------------

    def encode(self, views: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | x, y)``: mean and log-variance."""
        hr = self.rna_enc(**views["rna_sparse"]) if "rna_sparse" in views else self.rna_enc(self.rna_in(views["x"]))
        ha = self.atac_enc(**views["atac_sparse"]) if "atac_sparse" in views else self.atac_enc(views["y"])
        return self.heads_joint(self.shared(torch.cat([hr, ha], 1)))

    def decode(self, z: torch.Tensor, lib: torch.Tensor) -> dict[str, torch.Tensor]:
        """``p(x | z, c)`` and ``p(y | z, c)``: NB mean (``lib`` x softmax over genes) and
        dispersion, ZIP mean and dropout logits, and ``gamma = p(c | z)``."""
        dt = self.idf.dtype  # float32 under autocast too: the likelihoods need the precision
        gamma = self.prior.responsibilities(z.to(dt)).to(z.dtype)
        h = self.dec_rna_bn(self.dec_rna_ln(self.dec_rna_h(z)))
        h = _weighted(_weighted(h, self.dec_rna_mask(z)), self.cluster_rna(gamma))
        rho = torch.softmax(self.dec_rna_out(h).to(dt), dim=-1)
        a = self.dec_atac_bn(self.dec_atac_h(z))
        a = self.dec_atac_ln(a + self.dec_atac_attn(a)[0])
        a = _weighted(a, self.cluster_atac(gamma))
        return {"rna_mean": lib.unsqueeze(1) * rho, "theta": self.log_theta.exp(),
                "atac_mean": F.softplus(self.dec_atac_mean(a).to(dt)), "atac_dropout": self.dec_atac_drop(a).to(dt),
                "gamma": gamma}

    def loss_terms(self, views: dict, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-cell terms: ``recon_rna``, ``recon_atac`` (negative log-likelihoods), ``kl``
        (mixture KL) and ``cycle`` (the four consistency KLs), and ``mu``."""
        dt = self.idf.dtype
        mu, logvar = self.encode(views)
        mu, logvar = mu.to(dt), logvar.to(dt)
        if noise is None:
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=torch.float32)
        noise = noise.to(dt)
        z = mu + torch.exp(0.5 * logvar) * noise
        out = self.decode(z, views["lib"])
        recon_rna = -log_nb(views["x"], out["rna_mean"], out["theta"]).sum(1)
        recon_atac = -log_zip(views["y"], out["atac_mean"], out["atac_dropout"]).sum(1)
        kl = self.prior.kl(mu, logvar, z)
        cycle = torch.zeros_like(kl)
        if self.cycle:
            # the joint posterior is the cycle's target, not pulled towards the single encoders
            mu_t, lv_t = (mu.detach(), logvar.detach()) if self.detach_target else (mu, logvar)
            for m_, lv in (self.rna_single(self.rna_in(out["rna_mean"])), self.atac_single(out["atac_mean"]),
                           self.rna_single(**views["rna_sparse"]) if "rna_sparse" in views
                           else self.rna_single(self.rna_in(views["x"])),
                           self.atac_single(**views["atac_sparse"]) if "atac_sparse" in views
                           else self.atac_single(views["y"])):
                cycle = cycle + gaussian_kl(mu_t, lv_t, m_.to(dt), lv.to(dt))
        return {"recon_rna": recon_rna, "recon_atac": recon_atac, "kl": kl, "cycle": cycle, "mu": mu}

    def forward(self, x: torch.Tensor, cols=None, offsets=None, values=None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, step: int | None = None) -> torch.Tensor:
        """Mean loss of the batch (what DDP differentiates)."""
        t = self.loss_terms(self.split(x, cols, offsets, values), generator, noise)
        beta = 1.0 if step is None or self.kl_warmup <= 0 else min(1.0, (step + 1) / self.kl_warmup)
        return (self.rna_weight * t["recon_rna"] + self.atac_weight * t["recon_atac"] + beta * t["kl"]
                + t["cycle"]).mean()

    @torch.no_grad()
    def embed(self, cols, offsets, values) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent means and ``log p(z, c)`` at them, of a CSR batch (eval mode is the caller's)."""
        mu, _ = self.encode(self.split(None, cols, offsets, values))
        return mu, self.prior.log_joint(mu.float())
