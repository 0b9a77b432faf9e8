"""SCALE's network: an MLP encoder, a linear Bernoulli decoder and a Gaussian-mixture prior.

The model is the SCALE paper's (Xiong et al. 2019, Methods, Eq. 1-7)::

    p(x, z, c) = p(x|z) p(z|c) p(c),    ELBO(x) = E_q[log p(x|z)] - KL(q(z, c|x) || p(z, c))

with ``q(c|x)`` taken as the authors' floored ``p(c|z)`` (:meth:`GMMPrior.responsibilities`).
:meth:`SCALEModule.loss_terms` returns the per-cell reconstruction and KL terms. No store
slots: :class:`scatac_dist.models.SCALE` reads the data and writes the results.

The four parts of the KL term, the parametrisation of the prior (``pi`` as logits, raw
variances with a floor), the floor on the responsibilities, the optional per-cell depth
offset and the measurements behind each: ``docs/methods/scale.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GMMPrior", "MLPEncoder", "SCALEModule", "FULL_LAYERS", "QUICK_LAYERS"]

FULL_LAYERS = (3200, 1600, 800, 400)
QUICK_LAYERS = (1024, 128)
LOG_2PI = math.log(2 * math.pi)
VAR_FLOOR = 1e-8  # the authors add 1e-8 to the mixture's variances
GAMMA_FLOOR = 1e-10  # and 1e-10 to p(z, c) before normalising it into gamma
LOG_GAMMA_FLOOR = math.log(GAMMA_FLOOR)


def _row_lengths(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """Entries per row of a CSR batch given as row starts (``offsets``) and its ``nnz``."""
    return torch.diff(offsets, append=offsets.new_tensor([nnz]))


class _CSRTimesWeight(torch.autograd.Function):
    """``X @ W`` for a CSR batch ``X`` (``cols``, ``offsets``, ``values``) and a dense ``W``.

    Both directions are ``embedding_bag`` sums. Forward sums the rows of ``W`` of each cell's
    open peaks; backward computes ``dW = X^T @ dY`` the same way over ``X``'s transpose (each
    peak sums the gradient rows of the cells it is open in), so ``dW`` is written once. Torch's
    own ``embedding_bag`` backward zero-fills a dense ``dW`` and then scatters into it: on
    Leukemia at batch 128 that is 17.5 ms a step against 10.9 here (and 8.1 with the freed
    buffers kept, see :func:`scatac_dist.train.alloc.retain_freed_memory`). Only ``W`` gets a gradient.
    """

    @staticmethod
    def forward(ctx, cols, offsets, values, weight):
        ctx.save_for_backward(cols, offsets, values)
        ctx.n_input, ctx.weight_dtype = weight.shape[0], weight.dtype
        return F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out):
        cols, offsets, values = ctx.saved_tensors
        counts = _row_lengths(offsets, cols.numel())
        rows = torch.repeat_interleave(torch.arange(offsets.numel(), device=cols.device), counts)
        order = torch.argsort(cols, stable=True)  # the batch's entries, peak-major (CSR of X^T)
        per_peak = torch.bincount(cols, minlength=ctx.n_input)
        starts = torch.cumsum(per_peak, 0) - per_peak
        grad_w = F.embedding_bag(rows[order], grad_out.contiguous(), starts, mode="sum",
                                 per_sample_weights=values[order].to(grad_out.dtype))
        return None, None, None, grad_w.to(ctx.weight_dtype)


class SparseInputLinear(nn.Module):
    """A linear layer whose input may come as CSR pieces: ``x @ weight + bias``.

    The weight is stored input-major (``n_input x n_output``) so that a sparse batch is a
    weighted ``embedding_bag`` sum of the rows of its open peaks (:class:`_CSRTimesWeight`):
    at 4 % non-zeros that is a fraction of the time of the dense product, forward and
    backward (measured on the Leukemia set), and the result is the same.
    """

    def __init__(self, n_input: int, n_output: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_input, n_output))
        self.bias = nn.Parameter(torch.zeros(n_output))

    def forward(self, x: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                offsets: torch.Tensor | None = None, values: torch.Tensor | None = None) -> torch.Tensor:
        if cols is not None:
            return _CSRTimesWeight.apply(cols, offsets, values, self.weight) + self.bias
        return x @ self.weight + self.bias


class MLPEncoder(nn.Module):
    """``x -> (mu, logvar)``: Linear + ReLU layers, then two linear heads of size ``n_latent``.

    ``input_scale``: when set, each cell's input is first divided by its total and multiplied
    by ``input_scale`` (the authors' maintained package normalises totals the same way), so a
    cell with many open peaks is not encoded far out along a depth direction. Only the
    encoder's input changes; the likelihood stays on the binary data.
    """

    def __init__(self, n_input: int, hidden: tuple[int, ...], n_latent: int, input_scale: float | None = None):
        super().__init__()
        self.input_scale = None if input_scale is None else float(input_scale)
        if not hidden:
            raise ValueError("the encoder needs at least one hidden layer")
        self.first = SparseInputLinear(n_input, hidden[0])
        layers: list[nn.Module] = [nn.ReLU()]
        prev = hidden[0]
        for h in hidden[1:]:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.hidden = nn.Sequential(*layers)
        self.mu = nn.Linear(prev, n_latent)
        self.logvar = nn.Linear(prev, n_latent)

    def _normalised(self, x, offsets, values):
        if values is not None and offsets is not None:  # the CSR pieces are what the first layer reads
            lengths = _row_lengths(offsets, values.numel())
            rows = torch.repeat_interleave(torch.arange(len(offsets), device=values.device), lengths)
            totals = torch.zeros(len(offsets), dtype=values.dtype, device=values.device).index_add_(0, rows, values)
            values = values * (self.input_scale / totals.clamp_min(1e-12))[rows]
        elif x is not None:
            x = x * (self.input_scale / x.sum(1, keepdim=True).clamp_min(1e-12))
        return x, values

    def forward(self, x: torch.Tensor | None = None, cols=None, offsets=None, values=None):
        if self.input_scale is not None:
            x, values = self._normalised(x, offsets, values)
        h = self.hidden(self.first(x, cols, offsets, values))
        return self.mu(h), self.logvar(h)


class GMMPrior(nn.Module):
    """The mixture prior ``p(z, c)``: ``K`` diagonal Gaussians in the latent space.

    Parameters: ``logits`` (K), ``mu`` (K x D), ``var`` (K x D, raw variances, floored at
    :data:`VAR_FLOOR` where they are used). A state dict with the earlier ``log_var`` is
    converted on load.
    """

    def __init__(self, n_components: int, n_latent: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_components))
        self.mu = nn.Parameter(torch.zeros(n_components, n_latent))
        self.var = nn.Parameter(torch.ones(n_components, n_latent))

    @property
    def pi(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)

    @property
    def variances(self) -> torch.Tensor:
        return self.var.clamp_min(VAR_FLOOR)

    @torch.no_grad()
    def set_from(self, weights, means, variances) -> None:
        """Copy a fitted diagonal GMM in (scikit-learn's ``weights_``, ``means_``, ``covariances_``)."""
        w = torch.as_tensor(weights, dtype=self.logits.dtype).clamp_min(1e-10)
        self.logits.copy_(torch.log(w))
        self.mu.copy_(torch.as_tensor(means, dtype=self.mu.dtype))
        self.var.copy_(torch.as_tensor(variances, dtype=self.var.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "log_var"
        if old in state_dict:  # saved before the variances were stored raw
            state_dict[prefix + "var"] = state_dict.pop(old).exp()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        """``log p(z, c)`` for each cell and component (n x K)."""
        var = self.variances
        diff = z.unsqueeze(1) - self.mu.unsqueeze(0)  # n x K x D
        log_pz_c = -0.5 * (LOG_2PI + var.log().unsqueeze(0) + diff.pow(2) / var.unsqueeze(0)).sum(-1)
        return torch.log_softmax(self.logits, 0).unsqueeze(0) + log_pz_c

    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """``gamma`` (n x K), the authors' ``q(c|x)``: ``p(c|z)`` with :data:`GAMMA_FLOOR` added
        to every ``p(z, c)`` before normalising, as their code does.

        The floor matters only for a cell far from every component (all ``p(z, c)`` below
        1e-10): its ``gamma`` tends to uniform, so every component is pulled towards it, instead
        of the widest component alone taking it (what an exact ``p(c|z)`` does).
        """
        log_joint = self.log_joint(z)
        floor = torch.full_like(log_joint, LOG_GAMMA_FLOOR)
        return torch.softmax(torch.logaddexp(log_joint, floor), dim=1)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor,
           gamma: torch.Tensor | None = None) -> torch.Tensor:
        """Per cell, ``KL(q(z, c | x) || p(z, c))`` with ``q(z|x) = N(mu, e^logvar)`` and
        ``q(c|x) = gamma`` (default :meth:`responsibilities` at the sample ``z``), in SCALE's four
        parts: ``E[-log p(z|c)] + E[-log p(c)] + E[log q(z|x)] + E[log q(c|x)]``."""
        if gamma is None:
            gamma = self.responsibilities(z)
        var_c = self.variances
        expected = (LOG_2PI + var_c.log().unsqueeze(0)
                    + (logvar.exp().unsqueeze(1) + (mu.unsqueeze(1) - self.mu.unsqueeze(0)).pow(2))
                    / var_c.unsqueeze(0)).sum(-1)  # n x K
        neg_log_pzc = 0.5 * (gamma * expected).sum(1)
        neg_log_pc = -(gamma * torch.log_softmax(self.logits, 0).unsqueeze(0)).sum(1)
        log_qz = -0.5 * (1 + LOG_2PI + logvar).sum(1)
        log_qc = (gamma * torch.log(gamma.clamp_min(1e-10))).sum(1)
        return neg_log_pzc + neg_log_pc + log_qz + log_qc


class SCALEModule(nn.Module):
    """SCALE's VAE with a GMM prior.

    Parameters
    ----------
    n_input
        Peaks.
    n_components
        Mixture components ``K`` (clusters).
    hidden
        Encoder layer sizes: :data:`FULL_LAYERS` (paper default) or :data:`QUICK_LAYERS`.
    n_latent
        Latent dimensions (10 in the paper).
    input_scale
        Normalise each cell's encoder input to this total (:class:`MLPEncoder`); ``None``:
        the paper's binary input as it is.
    depth_ref
        When set, the decoder's logits in training get a per-cell offset
        ``log(open_i / depth_ref)`` (``open_i``: the cell's open peaks), the library-size term
        of count VAEs, so the latent need not carry a cell's depth. ``None``: the paper's
        decoder. Decoded outputs (imputation, specificity) are at the reference depth.
    """

    def __init__(self, n_input: int, n_components: int, hidden: tuple[int, ...] = FULL_LAYERS,
                 n_latent: int = 10, kl_warmup: int = 0, input_scale: float | None = None,
                 depth_ref: float | None = None):
        super().__init__()
        self.n_input, self.n_components, self.n_latent = n_input, n_components, n_latent
        self.depth_ref = None if depth_ref is None else float(depth_ref)
        self.hidden_sizes = tuple(int(h) for h in hidden)
        self.kl_warmup = int(kl_warmup)
        self.encoder = MLPEncoder(n_input, self.hidden_sizes, n_latent, input_scale)
        self.decoder = nn.Linear(n_latent, n_input)
        self.prior = GMMPrior(n_components, n_latent)
        # the authors' initialisation: Xavier-normal weights, zero biases
        for m in self.modules():
            if isinstance(m, (nn.Linear, SparseInputLinear)):  # Xavier is symmetric in fan-in/out
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def input_scale(self) -> float | None:
        return self.encoder.input_scale

    def config(self) -> dict:
        return {"n_input": self.n_input, "n_components": self.n_components,
                "hidden": list(self.hidden_sizes), "n_latent": self.n_latent, "kl_warmup": self.kl_warmup,
                "input_scale": self.input_scale, "depth_ref": self.depth_ref}

    def kl_weight(self, step: int | None) -> float:
        """The authors' deterministic warm-up: the KL weight rises linearly to 1 over ``kl_warmup`` steps."""
        if step is None or self.kl_warmup <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.kl_warmup)

    def inference(self, x: torch.Tensor, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, sparse: dict | None = None) -> dict[str, torch.Tensor]:
        """Encode: ``mu``, ``logvar`` and a reparameterised sample ``z = mu + exp(logvar/2) eps``.

        ``noise`` is ``eps`` itself; otherwise it is drawn from ``generator`` (the trainer's,
        seeded by step and rank) or from torch's global RNG.
        """
        mu, logvar = self.encoder(x) if sparse is None else self.encoder(**sparse)
        if noise is None:
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=torch.float32)
        eps = noise.to(mu.dtype)
        return {"mu": mu, "logvar": logvar, "z": mu + torch.exp(0.5 * logvar) * eps}

    def generative(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder logits (n x peaks); ``sigmoid`` of them is the imputed accessibility."""
        return self.decoder(z)

    def loss_terms(self, x: torch.Tensor, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, sparse: dict | None = None) -> dict[str, torch.Tensor]:
        """Per-cell reconstruction and KL terms (both to be minimised; their sum is -ELBO).

        ``sparse`` (``cols``, ``offsets``, ``values`` of the same batch) lets the encoder's
        first layer skip the zeros; the result is the same.
        """
        inf = self.inference(x, noise, generator, sparse)
        mu, logvar, z = inf["mu"], inf["logvar"], inf["z"]
        logits = self.generative(z)
        if self.depth_ref is not None:
            if sparse is not None:  # the CSR row lengths (zeros are never stored) spare a pass over x
                open_peaks = _row_lengths(sparse["offsets"], sparse["cols"].numel())
            else:
                open_peaks = (x != 0).sum(1)
            # in place: the decoder's product is not kept for its backward, and a batch x peaks
            # copy would cost a pass at every step
            logits = logits.add_(torch.log(open_peaks.to(logits.dtype).clamp_min(1) / self.depth_ref).unsqueeze(1))
        recon = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").sum(1)
        mu, logvar, z = mu.float(), logvar.float(), z.float()
        gamma = self.prior.responsibilities(z)  # n x K
        kl = self.prior.kl(mu, logvar, z, gamma)
        return {"recon": recon, "kl": kl, "gamma": gamma, "mu": mu}

    def forward(self, x: torch.Tensor, cols=None, offsets=None, values=None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, step: int | None = None) -> torch.Tensor:
        """Mean loss of the batch, ``recon + beta * kl`` (``-ELBO`` once ``beta`` = 1): what DDP differentiates."""
        sparse = None if cols is None else {"cols": cols, "offsets": offsets, "values": values}
        t = self.loss_terms(x, noise, generator, sparse)
        return (t["recon"] + self.kl_weight(step) * t["kl"]).mean()
