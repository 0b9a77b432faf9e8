"""Atlases calibrated on a real labelled store: learn what a generator needs, generate any size.

:func:`learn_like` reads a labelled reference store (at most ``max_cells`` sampled cells) and
keeps, in a :class:`LikeParams` of a few hundred kB:

* the cell types and their proportions;
* for each type, the share of its cells in which each peak is open, for up to
  :data:`MAX_PROFILE_PEAKS` sampled peaks (with one pseudo-cell at the peak's mean);
* for each type, quantiles of the open peaks per cell (the depth distribution);
* the distribution of count values of the open entries (all 1 for a binarised store);
* within-type heterogeneity: each cell is a mixture of its own type's profile (weight
  ``w``) and one partner type's. ``w ~ Beta`` per type and the partner's probabilities are
  estimated by EM on the reference's cells, and the attenuation that sparse counts cause in
  that estimate is removed by simulation (cells generated at known ``w`` are estimated the
  same way; the real estimate is read off that curve);
* the chromosomes (names, spans, share of peaks) and the median peak width.

Co-accessibility comes from the shared type profiles and from the per-cell mixing; peak-peak
correlation inside a type beyond that is not modelled.

:func:`synthesize_like` generates N cells x M peaks from it. With M up to the stored peaks
they are drawn without replacement; beyond, stored peaks are drawn again with a log-normal
jitter of their level (sd :data:`NEW_PEAK_JITTER`), their pattern over types kept. The
open peaks per cell follow the reference whatever M is (a peak set partitions a cell's
fragments; more peaks do not give a cell more fragments).

A cell of type ``t`` with target ``n`` open peaks draws ``n * kappa_t`` events from the
mixture of the two profiles, where the per-peak event weights are ``-log(1 - p)`` of the
open shares ``p``, so that a peak is open with probability ``p`` and ``kappa_t`` makes up
for events landing on a peak already open. Each open entry then takes a value from the
learned value distribution.

Presets (:data:`PRESETS`): ``"mouse"``, learned from the SNARE-seq mouse motor cortex ATAC
(mm10), and ``"human"``, from the Buenrostro 2018 bone marrow set bm0828 (hg19); the
parameter files ship with the package (``scatac_dist/presets``), not the data.

Determinism: as in :mod:`scatac_dist.datasets`, block ``k`` of :data:`GEN_BLOCK` cells is
drawn from ``default_rng([seed, k])``: the atlas depends on the parameters and the seed,
never on the chunking or the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .io.features import peak_var

logger = logging.getLogger("scatac_dist")

__all__ = ["LikeParams", "PRESETS", "learn_like", "separation", "load_like", "generate_like_rows", "like_obs",
           "like_var", "synthesize_like", "qc_summary", "compare_qc"]

GEN_BLOCK = 1024
MAX_PROFILE_PEAKS = 40_000
MAX_REFERENCE_CELLS = 20_000
NEW_PEAK_JITTER = 0.3
VALUE_CAP = 64
N_QUANTILES = 41
OPEN_CAP = 0.99
#: own-type weight means tried, the Beta's concentration, the largest mean, events per simulated type
MU_GRID = (1.0, 0.85, 0.7, 0.55, 0.4)
OWN_CONCENTRATION = 5.0
MAX_OWN = 0.999
SIM_EVENTS = 150_000
#: co-accessibility modules: how many, and the singular vectors that group the peaks
N_MODULES = 50
#: pseudo-cells at the peak's overall mean added to each type's open counts
PRIOR_CELLS = 1.0
#: the heterogeneity's calibration: cells simulated, bisection steps
CALIBRATION_CELLS = 4000
BISECTION_STEPS = 8
MAX_REPLICATES = 8
MODULE_DIMS = 20
PRESET_DIR = Path(__file__).with_name("presets")
PRESETS = {"mouse": "mouse_snare_mop.npz", "human": "human_bm0828.npz"}


@dataclass(frozen=True, eq=False)
class LikeParams:
    """What :func:`learn_like` learned from a reference store (see the module docstring).

    Arrays: ``proportions`` (T,), ``open_share`` (S stored peaks x T types, the shrunk share
    of a type's cells in which the peak is open), ``depth_quantiles`` (T x Q: open peaks per
    cell at evenly spaced quantiles), ``own_beta`` (T x 2: Beta a, b of the own-type weight),
    ``partner`` (T x T, rows sum to 1, zero diagonal), ``values`` (pmf of the count values
    1..V), ``chrom_span`` and ``chrom_share`` (per chromosome), ``module_of`` (S: each stored
    peak's co-accessibility module), ``module_sigma`` (T x K: log-normal sd of a cell's
    multiplier of each module).
    """

    name: str
    reference: str
    label_key: str
    types: tuple[str, ...]
    proportions: np.ndarray
    open_share: np.ndarray
    depth_quantiles: np.ndarray
    own_beta: np.ndarray
    partner: np.ndarray
    values: np.ndarray
    chroms: tuple[str, ...]
    chrom_span: np.ndarray
    chrom_share: np.ndarray
    peak_width: int
    n_ref_cells: int
    n_ref_peaks: int
    shrinkage: float
    background: float
    module_of: np.ndarray
    module_sigma: np.ndarray

    @property
    def n_types(self) -> int:
        return len(self.types)

    @property
    def fingerprint(self) -> str:
        """A short hash of the parameters: the cache key of derived models."""
        h = hashlib.sha1()
        for f in fields(self):
            v = getattr(self, f.name)
            h.update(np.ascontiguousarray(v).tobytes() if isinstance(v, np.ndarray) else repr(v).encode())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write the parameters to ``path`` (``.npz``; float16 shares, the rest exact)."""
        path = Path(path)
        d = asdict(self)
        arrays = {k: (v.astype(np.float16) if k == "open_share" else v) for k, v in d.items()
                  if isinstance(v, np.ndarray)}
        meta = {k: ([str(x) for x in v] if isinstance(v, tuple) else v.item() if isinstance(v, np.generic) else v)
                for k, v in d.items() if not isinstance(v, np.ndarray)}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LikeParams:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
        arrays["open_share"] = arrays["open_share"].astype(np.float32)
        meta = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta.items()}
        return cls(**meta, **arrays)


def load_like(like: str | Path | LikeParams) -> LikeParams:
    """``like`` as parameters: a preset name (:data:`PRESETS`), a saved ``.npz``, or a labelled
    store to learn from (:func:`learn_like` with its defaults)."""
    if isinstance(like, LikeParams):
        return like
    if isinstance(like, str) and like in PRESETS:
        return LikeParams.load(PRESET_DIR / PRESETS[like])
    path = Path(like)
    if path.suffix == ".npz" and path.is_file():
        return LikeParams.load(path)
    if path.exists():
        return learn_like(path)
    raise ValueError(f"--like {like!r}: not a preset ({', '.join(PRESETS)}), a parameter file (.npz) "
                     "or a store; pass one of those")


# --------------------------------------------------------------------------- learning


def _reference(store: str | Path, label_key: str | None, exclude: tuple[str, ...], max_cells: int,
               seed: int) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame, str]:
    """The labelled cells' counts (at most ``max_cells``, sampled), their labels, var, the key."""
    from .store import Atlas

    atlas = Atlas(store)
    obs = atlas.obs
    if atlas.is_mudata:  # a MuData store keeps joined labels in its root obs
        import zarr
        from anndata.io import read_elem

        root = read_elem(zarr.open_group(str(atlas.path), mode="r")["obs"])
        obs = obs.join(root[[c for c in root.columns if c not in obs.columns]], how="left")
    if label_key is None:
        cands = [c for c in ("celltype", "cell_type", "cluster", "label") if c in obs.columns]
        if not cands:
            raise ValueError(f"{atlas.path}: no label column among {list(obs.columns)}; "
                             "pass label_key (--label-key) naming the cell-type column")
        label_key = cands[0]
    if label_key not in obs.columns:
        raise ValueError(f"{atlas.path}: no column {label_key!r} in obs (it has {list(obs.columns)}); "
                         "pass --label-key naming the cell-type column")
    labels = obs[label_key].astype("string")
    keep = labels.notna().to_numpy() & ~labels.isin(list(exclude)).fillna(False).to_numpy()
    idx = np.flatnonzero(keep)
    if idx.size < 50:
        raise ValueError(f"{atlas.path}: only {idx.size} labelled cells in {label_key!r}; need >= 50")
    if idx.size > max_cells:
        idx = np.sort(np.random.default_rng([seed, 0x1EA2]).choice(idx, max_cells, replace=False))
    X = atlas.X
    blocks, start = [], 0
    for k, rows in enumerate(X.chunks[0]):  # read block by block, keep the sampled rows
        sel = idx[(idx >= start) & (idx < start + rows)] - start
        if sel.size:
            blocks.append(sp.csr_matrix(X.blocks[k].compute(scheduler="synchronous"))[sel])
        start += rows
    return sp.vstack(blocks, format="csr"), labels.to_numpy()[idx].astype(str), atlas.var, label_key


def _shrunk_open_share(B: sp.csr_matrix, codes: np.ndarray, n_types: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Per type and peak, the share of cells with the peak open, with :data:`PRIOR_CELLS`
    pseudo-cells at the peak's mean over all cells (so a small type's unseen peak is not
    closed for good); also each open entry's share for its own cell's type with that cell
    left out (what the mixing estimate compares a cell to, so that it is not compared with
    itself). A prior fitted to the between-type variance (method of moments, one strength for
    all peaks) was tried and shrank marker peaks away on sparse data (SNARE: strength 530,
    types no longer separable); the heterogeneity calibration makes up for the noise left."""
    n_t = np.bincount(codes, minlength=n_types).astype(float)
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_types, len(codes)))
    k = np.asarray((onehot @ B).todense())  # T x P open counts
    mean = k.sum(0) / n_t.sum()
    alpha = PRIOR_CELLS
    shrunk = (k + alpha * mean) / (n_t[:, None] + alpha)
    rows = np.repeat(codes, np.diff(B.indptr))
    loo = (k[rows, B.indices] - 1 + alpha * mean[B.indices]) / (n_t[rows] - 1 + alpha)
    return np.minimum(shrunk, OPEN_CAP).T.astype(np.float32), alpha, np.minimum(loo, OPEN_CAP)  # P x T


def _event_weights(open_share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-type event weights over peaks (T x P, rows sum to 1) and the events per open peak
    ``kappa`` (T,): ``-log(1 - p)`` makes a peak open with probability ``p``."""
    h = -np.log1p(-np.minimum(open_share, OPEN_CAP)).T.astype(np.float64)
    tot = h.sum(1)
    kappa = tot / np.maximum(open_share.sum(0), 1e-12)
    return h / np.maximum(tot[:, None], 1e-300), kappa


def _mixture_em(B: sp.csr_matrix, G: np.ndarray, iters: int = 50, own: tuple | None = None) -> np.ndarray:
    """Per cell, the mixture weights over the T profiles (rows of ``G``) that best explain its
    open peaks (EM for the proportions of a mixture with fixed components). ``own``:
    ``(codes, weights)``, each open entry's weight under its cell's type replaced (left-out
    profiles)."""
    B = sp.csr_matrix(B)
    rows = np.repeat(np.arange(B.shape[0]), np.diff(B.indptr))
    Gc = G[:, B.indices].T.astype(np.float32)  # nnz x T
    if own is not None:
        Gc[np.arange(len(rows)), own[0][rows]] = own[1]
    n_open = np.maximum(np.diff(B.indptr), 1).astype(np.float32)
    pi = np.full((B.shape[0], G.shape[0]), 1.0 / G.shape[0], np.float32)
    for _ in range(iters):
        num = pi[rows] * Gc
        num /= np.maximum(num.sum(1, keepdims=True), 1e-30)
        new = np.zeros_like(pi)
        _scatter_rows(new, rows, num)
        pi = new / n_open[:, None]
    return pi


def _scatter_rows(out: np.ndarray, rows: np.ndarray, vals: np.ndarray) -> None:
    for t in range(out.shape[1]):
        out[:, t] = np.bincount(rows, weights=vals[:, t], minlength=out.shape[0])


@dataclass(frozen=True)
class _Sampler:
    """Draws events over peaks by module: per type, the module masses ``W`` (T x K) and the
    cumulative weights over the peaks sorted by module (``cdf``, T x P; ``order`` maps back)."""

    W: np.ndarray
    cdf: np.ndarray
    order: np.ndarray
    seg_lo: np.ndarray  # K: first sorted position of each module
    seg_hi: np.ndarray  # K: one past the last
    kappa: np.ndarray  # T: events per open peak

    @classmethod
    def build(cls, share: np.ndarray, module_of: np.ndarray, n_modules: int) -> _Sampler:
        G, kappa = _event_weights(share)
        order = np.argsort(module_of, kind="stable")
        sizes = np.bincount(module_of, minlength=n_modules)
        hi = np.cumsum(sizes)
        W = np.stack([np.bincount(module_of, weights=G[t], minlength=n_modules) for t in range(G.shape[0])])
        return cls(W, np.cumsum(G[:, order], axis=1), order, hi - sizes, hi, kappa)

    def draw(self, rng: np.random.Generator, labels: np.ndarray, own_w: np.ndarray, partners: np.ndarray,
             n_open: np.ndarray, mult: np.ndarray, background: float, proportions: np.ndarray) -> sp.csr_matrix:
        """Binary cells x peaks: cell i draws ``n_open[i] * kappa[t]`` events; a share
        ``background`` of them from types drawn by ``proportions``, of the rest a share
        ``own_w[i]`` from its type's profile and the others from its partner's; each module's
        mass is scaled by the cell's multiplier ``mult[i, m]``."""
        n, P = len(labels), self.cdf.shape[1]
        T = self.W.shape[0]
        events = np.maximum(1, np.rint(n_open * self.kappa[labels])).astype(np.int64)
        bg = rng.binomial(events, background) if background > 0 else np.zeros(n, np.int64)
        own = rng.binomial(events - bg, np.clip(own_w, 0, 1))
        counts = rng.multinomial(bg, proportions) if background > 0 else np.zeros((n, T), np.int64)
        np.add.at(counts, (np.arange(n), labels), own)
        np.add.at(counts, (np.arange(n), partners), events - bg - own)
        cells, pos = [], []
        for t in np.flatnonzero(counts.sum(0)):
            idx = np.flatnonzero(counts[:, t])
            pv = self.W[t] * mult[idx]
            pv /= pv.sum(1, keepdims=True)
            per = rng.multinomial(counts[idx, t], pv)  # cells x K
            ci, mi = np.nonzero(per)
            c = per[ci, mi]
            ci, mi = np.repeat(ci, c), np.repeat(mi, c)
            cdf = self.cdf[t]
            lo = np.where(self.seg_lo[mi] > 0, cdf[np.maximum(self.seg_lo[mi] - 1, 0)], 0.0)
            u = lo + rng.random(ci.size) * (cdf[self.seg_hi[mi] - 1] - lo)
            # a draw on a boundary stays inside its module
            at = np.clip(np.searchsorted(cdf, u, side="right"), self.seg_lo[mi], self.seg_hi[mi] - 1)
            cells.append(idx[ci])
            pos.append(self.order[at])
        key = np.unique(np.concatenate(cells).astype(np.int64) * P + np.concatenate(pos))
        return sp.csr_matrix((np.ones(key.size, np.uint32), (key // P, key % P)), shape=(n, P))


def _multipliers(rng: np.random.Generator, factor: np.ndarray, n: int) -> np.ndarray:
    """Per-cell module multipliers ``exp(z - diag/2)``, ``z ~ N(0, F F^T)`` (mean 1), n x K."""
    z = rng.standard_normal((n, factor.shape[0])) @ factor.T
    return np.exp(z - (factor**2).sum(1) / 2)


def _modules(B: sp.csr_matrix, codes: np.ndarray, P: np.ndarray, n_modules: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Co-accessibility modules: peaks grouped by how they vary together inside the types,
    and per type the spread of each module's share of a cell's open peaks beyond sampling.

    The residual of the open peaks from each cell's type mean (scaled to the cell's number of
    open peaks, peaks weighted by ``1/sqrt(p(1-p))``) is reduced to its top
    :data:`MODULE_DIMS` singular vectors; peaks are grouped by k-means on their loadings. For
    cell i and module m the open peaks ``o`` against their expectation ``e`` give the ratios
    ``o/e``; their covariance inside the types (pooled), less the sampling variance ``1/e``
    on the diagonal, is the covariance of the multipliers, returned as a factor of the
    covariance of their logs."""
    from scipy.sparse.linalg import LinearOperator, svds
    from sklearn.cluster import KMeans

    n, S = B.shape
    T = P.shape[1]
    n_open = np.diff(B.indptr).astype(float)
    expected_open = P.sum(0)  # per type
    scale = n_open / expected_open[codes]
    mean = np.asarray(B.mean(0)).ravel()
    d = 1 / np.sqrt(np.maximum(mean * (1 - mean), 1e-6))
    onehot = sp.csr_matrix((scale, (np.arange(n), codes)), shape=(n, T))

    def mv(v):
        v = np.asarray(v).reshape(S, -1) * d[:, None]
        return B @ v - onehot @ (P.T @ v)

    def rmv(u):
        u = np.asarray(u).reshape(n, -1)
        return d[:, None] * (B.T @ u - P @ (onehot.T @ u))

    op = LinearOperator((n, S), matvec=mv, rmatvec=rmv, matmat=mv, rmatmat=rmv, dtype=float)
    k = min(MODULE_DIMS, min(n, S) - 2)
    _, sv, vt = svds(op, k=k, random_state=seed)
    emb = (vt.T * sv)
    module_of = KMeans(n_modules, n_init=3, random_state=seed).fit_predict(emb).astype(np.int32)
    M = sp.csr_matrix((np.ones(S), (np.arange(S), module_of)), shape=(S, n_modules))
    obs = np.asarray((B @ M).todense())  # n x K
    e = np.maximum((P.T @ M.toarray())[codes] * scale[:, None], 1e-9)  # n x K
    r = obs / e
    r -= np.stack([r[codes == t].mean(0) for t in range(T)])[codes]  # centred inside each type
    cov = r.T @ r / max(n - T, 1) - np.diag((1 / e).mean(0))  # pooled over types, less sampling noise
    cov = np.log1p(np.clip(_psd(cov), -0.99, None))  # of the log multipliers (log-normal, mean 1)
    return module_of, np.linalg.cholesky(_psd(cov) + 1e-9 * np.eye(n_modules))


def _psd(a: np.ndarray) -> np.ndarray:
    """The nearest positive semi-definite matrix (negative eigenvalues set to 0)."""
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.clip(vals, 0, None)) @ vecs.T


def _core_shares(P: np.ndarray, mu: np.ndarray, partner: np.ndarray, background: float = 0.0,
                 proportions: np.ndarray | None = None) -> np.ndarray:
    """Open shares of the types' cores (S x T): the profiles whose mixture (own weight ``mu``,
    partners ``partner``, a share ``background`` from all types by ``proportions``) has the
    observed type means ``P`` (solved in event-weight space, clipped at 0)."""
    G, _ = _event_weights(P)
    tot = -np.log1p(-np.minimum(P, OPEN_CAP)).sum(0)  # per type, the events that give P's open peaks
    A = np.diag(mu) + (1 - mu)[:, None] * partner
    if background > 0:
        A = (1 - background) * A + background * np.outer(np.ones(len(mu)), proportions)
    Q = np.clip(np.linalg.solve(A, G), 0, None)
    Q /= np.maximum(Q.sum(1, keepdims=True), 1e-300)
    return np.minimum(-np.expm1(-Q.T * tot[None, :]), OPEN_CAP).astype(np.float32)


def _simulate_types(rng, share, depth_q, partner, mu, n_sim, module_of, sigma, background=0.0,
                    proportions=None, labels=None):
    """``n_sim[t]`` cells of each type t (or the given ``labels``), own weight
    ``Beta(mu kappa, (1 - mu) kappa)``, a share ``background`` from all types."""
    T = share.shape[1]
    sampler = _Sampler.build(share, module_of, sigma.shape[0])
    if labels is None:
        labels = np.repeat(np.arange(T), n_sim)
    else:
        n_sim = np.bincount(labels, minlength=T)
        labels = np.repeat(np.arange(T), n_sim)
    m = np.minimum(mu[labels], MAX_OWN)
    w = rng.beta(m * OWN_CONCENTRATION, (1 - m) * OWN_CONCENTRATION)
    cum = np.cumsum(partner[labels], axis=1)
    partners = np.minimum((rng.random(len(labels))[:, None] * cum[:, -1:] > cum).sum(1), T - 1)
    n_open = np.concatenate([_depth_draw(depth_q[t], rng.random(n_sim[t])) for t in range(T)])
    props = proportions if proportions is not None else np.full(T, 1 / T)
    return sampler.draw(rng, labels, w, partners, n_open, _multipliers(rng, sigma, len(labels)), background,
                        props), labels


def _calibrate_mixing(B: sp.csr_matrix, codes: np.ndarray, P: np.ndarray, loo: np.ndarray,
                      depth_q: np.ndarray, module_of: np.ndarray, sigma: np.ndarray,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Own-type weight means (T,) and the partner matrix (T x T).

    The own-type weight of each reference cell is estimated by EM against the type means
    ``P``; its spread within a type beyond what sparse sampling alone gives is the
    heterogeneity. Cells are simulated at own-weight means on :data:`MU_GRID` (cores
    un-diluted so that each type's mean stays ``P``) and estimated the same way; each type's
    mean is read off where the simulated spread equals the reference's."""
    T = P.shape[1]
    G, _ = _event_weights(P)
    tot = -np.log1p(-np.minimum(P, OPEN_CAP)).sum(0)
    rows = np.repeat(codes, np.diff(B.indptr))
    pi = _mixture_em(B, G, own=(codes, -np.log1p(-loo) / tot[rows]))
    own_hat = pi[np.arange(len(codes)), codes]
    partner = np.zeros((T, T))
    for t in range(T):
        off = pi[codes == t].copy()
        off[:, t] = 0
        row = (off / np.maximum(off.sum(1, keepdims=True), 1e-12)).mean(0)
        row[t] = 0
        partner[t] = row / row.sum() if row.sum() > 0 else np.where(np.arange(T) == t, 0.0, 1.0 / max(T - 1, 1))
    if T == 1:
        return np.ones(1), partner
    real_var = np.array([own_hat[codes == t].var() for t in range(T)])
    rng = np.random.default_rng([seed, 0xCA1])
    mean_open = np.array([np.interp(0.5, np.linspace(0, 1, depth_q.shape[1]), depth_q[t]) for t in range(T)])
    n_sim = np.clip(SIM_EVENTS // np.maximum(mean_open, 1), 20, 100).astype(int)
    sim_var = []
    for mu in MU_GRID:
        mus = np.full(T, mu)
        sim, labels = _simulate_types(rng, _core_shares(P, mus, partner), depth_q, partner, mus, n_sim,
                                       module_of, sigma)
        est = _mixture_em(sim, G)[np.arange(len(labels)), labels]
        sim_var.append([est[labels == t].var() for t in range(T)])
    sim_var = np.array(sim_var)  # grid x T, grows as mu falls
    grid = np.array(MU_GRID)
    mu = np.array([float(np.interp(real_var[t], np.maximum.accumulate(sim_var[:, t]), grid))
                   for t in range(T)])
    logger.info("own-type weight spread, reference %s; simulated at mu=1 %s; fitted mu %s",
                np.round(real_var, 4).tolist(), np.round(sim_var[0], 4).tolist(), np.round(mu, 2).tolist())
    return mu, partner


def separation(B: sp.spmatrix, labels: np.ndarray, *, n_comps: int = 30, seed: int = 0) -> float:
    """How well the labels separate in the default pipeline's embedding: the ARI of k-means
    (k = the number of labels, best of 20 starts, as ``tl.kmeans``) in the spectral
    embedding that ``tl.spectral`` computes, here in memory for a few thousand cells.

    As there: binarised rows over the peaks seen, IDF ``log(n / (1 + c_j))``, unit length, so
    ``S = X X^T`` is the cosine similarity; its diagonal zeroed; the leading eigenvectors of
    ``D^-1/2 (S - I) D^-1/2`` (matrix-free, ARPACK), the trivial first dropped, the rest
    scaled by the square root of their eigenvalues. The zeroed diagonal matters on sparse
    cells, where it dominates the similarity.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    B = sp.csr_matrix(B, dtype=np.float64, copy=True)
    B.data[:] = 1
    n = B.shape[0]
    c = np.asarray(B.sum(0)).ravel()
    B = sp.csr_matrix(B[:, c > 0])
    A = sp.csr_matrix(B @ sp.diags(np.log(n / (1.0 + c[c > 0]))))
    norm = np.sqrt(np.asarray(A.multiply(A).sum(1)).ravel())
    A = sp.csr_matrix(sp.diags(1 / np.maximum(norm, 1e-12)) @ A)
    unit = (norm > 0).astype(np.float64)                            # S's diagonal: 1, or 0 for an empty cell
    deg = A @ np.asarray(A.T @ np.ones(n)).ravel() - unit
    r = 1 / np.sqrt(np.maximum(deg, 1e-12))

    def mv(v):
        v = np.asarray(v).reshape(n, -1) * r[:, None]
        return (A @ (A.T @ v) - unit[:, None] * v) * r[:, None]

    k = min(n_comps + 1, n - 2)
    op = LinearOperator((n, n), matvec=mv, matmat=mv, dtype=np.float64)
    lam, V = eigsh(op, k=k, which="LA", v0=np.random.default_rng(seed).random(n))
    order = np.argsort(-lam)
    lam, V = lam[order][1:], V[:, order][:, 1:]
    E = V * np.sqrt(np.maximum(lam, 0))
    n_labels = len(np.unique(labels))
    return float(adjusted_rand_score(labels, KMeans(n_labels, n_init=20, random_state=seed).fit_predict(E)))


def _heterogeneity(mu: np.ndarray, h: float) -> tuple[np.ndarray, float]:
    """The own-type weight means at heterogeneity ``h`` in [-1, 1): the estimated mixing
    ``1 - mu`` scaled by ``1 + h`` below 0 (-1: pure cells), the own weight ``mu`` scaled by
    ``1 - h`` above; and the background share (0: kept for other calibrations)."""
    if h <= 0:
        return 1 - (1 - mu) * (1 + h), 0.0
    return np.maximum(mu * (1 - h), 0.05), 0.0


def _calibrate_heterogeneity(B, codes, P, mu, partner, proportions, depth_q, module_of, sigma,
                             seed) -> tuple[np.ndarray, float]:
    """Own-type weight means and background share such that simulated cells have the
    reference's :func:`separation` (bisection on :func:`_heterogeneity`'s ``h``; both on the
    same cells' labels). A reference of fewer than :data:`CALIBRATION_CELLS` cells is
    simulated several times at each step (at most :data:`MAX_REPLICATES`) and the mean taken,
    as one small simulation's separation varies with its seed."""
    rng = np.random.default_rng([seed, 0xB6])
    n = min(B.shape[0], CALIBRATION_CELLS)
    take = np.sort(rng.choice(B.shape[0], n, replace=False))
    target = separation(B[take], codes[take], seed=seed)

    replicates = int(np.clip(-(-CALIBRATION_CELLS // n), 1, MAX_REPLICATES))

    def separation_at(h):
        m, bg = _heterogeneity(mu, h)
        core = _core_shares(P, m, partner, bg, proportions)
        got = []
        for r in range(replicates):
            sim, labels = _simulate_types(np.random.default_rng([seed, 0xB7, r]), core, depth_q, partner, m,
                                          None, module_of, sigma, bg, proportions, labels=codes[take])
            got.append(separation(sim, labels, seed=seed))
        return float(np.mean(got))

    lo, hi = -1.0, 0.95
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        got = separation_at(mid)
        lo, hi = (mid, hi) if got > target else (lo, mid)
    h = (lo + hi) / 2
    logger.info("separation: reference %.3f, simulated %.3f at heterogeneity %.3f", target, got, h)
    return _heterogeneity(mu, h)


def _depth_draw(quantiles: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Open peaks per cell at uniform draws ``u`` (log-linear between the stored quantiles)."""
    q = np.linspace(0, 1, len(quantiles))
    return np.maximum(1, np.rint(np.exp(np.interp(u, q, np.log(np.maximum(quantiles, 1.0))))))


def learn_like(store: str | Path, label_key: str | None = None, *, exclude: tuple[str, ...] = (),
               max_cells: int = MAX_REFERENCE_CELLS, name: str | None = None, seed: int = 0) -> LikeParams:
    """Learn a generator's parameters from a labelled store (see the module docstring).

    Reads
    -----
    ``X`` (counts) of at most ``max_cells`` labelled cells, ``obs[label_key]`` (a MuData
    store: the modality's ``obs`` joined with the root's), ``var`` (``chr``, ``start``,
    ``end``). Writes nothing.

    Parameters
    ----------
    label_key
        The cell-type column (default: the first of ``celltype``, ``cell_type``,
        ``cluster``, ``label``).
    exclude
        Labels to leave out (unassigned cells, e.g. ``"Mis"``).
    """
    X, labels, var, key = _reference(store, label_key, tuple(exclude), max_cells, seed)
    types, codes = np.unique(labels, return_inverse=True)
    T = len(types)
    rng = np.random.default_rng([seed, 0x5EED])
    keep_peaks = np.sort(rng.choice(X.shape[1], min(X.shape[1], MAX_PROFILE_PEAKS), replace=False))
    B = X.copy()
    B.data = np.ones_like(B.data, dtype=np.float32)
    B = sp.csr_matrix(B[:, keep_peaks])
    open_share, alpha, loo = _shrunk_open_share(B, codes, T)
    n_open_all = np.diff(X.indptr)
    qs = np.linspace(0, 1, N_QUANTILES)
    depth_q = np.stack([np.quantile(n_open_all[codes == t], qs) for t in range(T)])
    # the depth over the stored peaks only: what the mixing estimate sees
    depth_q_stored = np.stack([np.quantile(np.diff(B.indptr)[codes == t], qs) for t in range(T)])
    n_modules = int(min(N_MODULES, max(2, B.shape[1] // 200), max(2, B.shape[0] // 10)))
    module_of, sigma = _modules(B, codes, open_share, n_modules, seed)
    mu, partner = _calibrate_mixing(B, codes, open_share, loo, depth_q_stored, module_of, sigma, seed)
    proportions = np.bincount(codes, minlength=T) / len(codes)
    mu, background = _calibrate_heterogeneity(B, codes, open_share, mu, partner, proportions, depth_q_stored,
                                              module_of, sigma, seed)
    core = _core_shares(open_share, mu, partner, background, proportions)
    m = np.minimum(mu, MAX_OWN)
    own_beta = np.stack([m * OWN_CONCENTRATION, (1 - m) * OWN_CONCENTRATION], axis=1)
    vals = np.minimum(np.rint(X.data).astype(np.int64), VALUE_CAP)
    values = np.bincount(vals, minlength=2)[1:].astype(float)
    values /= values.sum()
    chrom = var["chr"].astype(str).to_numpy()
    start, end = var["start"].to_numpy(np.int64), var["end"].to_numpy(np.int64)
    chroms = list(dict.fromkeys(chrom))
    span = np.array([end[chrom == c].max() for c in chroms], np.int64)
    share = np.array([(chrom == c).sum() for c in chroms], float) / len(chrom)
    p = LikeParams(
        name=name or Path(store).stem, reference=f"{Path(store).name}: {X.shape[0]} labelled cells, {X.shape[1]} peaks",
        label_key=key, types=tuple(types), proportions=proportions,
        open_share=core, depth_quantiles=depth_q.astype(np.float32), own_beta=own_beta, partner=partner,
        values=values, chroms=tuple(chroms), chrom_span=span, chrom_share=share,
        peak_width=int(np.median(end - start)), n_ref_cells=int(X.shape[0]), n_ref_peaks=int(X.shape[1]),
        shrinkage=alpha, background=background, module_of=module_of.astype(np.int16), module_sigma=sigma.astype(np.float32))
    logger.info("learned %s: %d types, %d peaks stored, shrinkage %.1f", p.name, T, core.shape[0], alpha)
    return p


# --------------------------------------------------------------------------- generation


_MODELS: dict[tuple, _Sampler] = {}


def _model(p: LikeParams, n_peaks: int, seed: int) -> _Sampler:
    """The sampler of an atlas of ``n_peaks`` (cached: one atlas at a time per process)."""
    key = (p.fingerprint, n_peaks, seed)
    m = _MODELS.get(key)
    if m is None:
        rng = np.random.default_rng([seed, 0x9EA5])
        S = p.open_share.shape[0]
        first = rng.permutation(S)[: min(S, n_peaks)]
        extra = rng.integers(0, S, max(0, n_peaks - S))
        rows = np.concatenate([first, extra])
        share = p.open_share[rows].astype(np.float64)
        if extra.size:
            share[S:] *= rng.lognormal(0.0, NEW_PEAK_JITTER, extra.size)[:, None]
        m = _Sampler.build(np.minimum(share, OPEN_CAP), p.module_of[rows].astype(np.int64), p.module_sigma.shape[0])
        _MODELS.clear()
        _MODELS[key] = m
    return m


def _block_cells(p: LikeParams, rng: np.random.Generator, n: int):
    # drawn first from each block's stream, so obs can be built without the counts
    labels = rng.choice(p.n_types, size=n, p=p.proportions)
    return labels


def _gen_block(p: LikeParams, n_cells: int, n_peaks: int, seed: int, k: int) -> sp.csr_matrix:
    m = _model(p, n_peaks, seed)
    n = min(GEN_BLOCK, n_cells - k * GEN_BLOCK)
    rng = np.random.default_rng([seed, k])
    labels = _block_cells(p, rng, n)
    u = rng.random(n)
    n_open = np.empty(n)
    for t in np.unique(labels):
        sel = labels == t
        n_open[sel] = _depth_draw(p.depth_quantiles[t], u[sel])
    a, b = p.own_beta[labels, 0], p.own_beta[labels, 1]
    own_w = rng.beta(a, b)
    cum = np.cumsum(p.partner[labels], axis=1)
    partners = np.minimum((rng.random(n)[:, None] * cum[:, -1:] > cum).sum(1), p.n_types - 1)
    B = m.draw(rng, labels, own_w, partners, n_open, _multipliers(rng, p.module_sigma, n), p.background,
               p.proportions)
    vals = rng.choice(np.arange(1, len(p.values) + 1), size=B.nnz, p=p.values)
    B.data = vals.astype(np.uint32)
    return B


def generate_like_rows(params: LikeParams, n_cells: int, n_peaks: int, seed: int, start: int,
                       stop: int) -> sp.csr_matrix:
    """Counts of cells ``[start, stop)`` of the atlas, the same whatever range is asked for."""
    k0, k1 = start // GEN_BLOCK, (stop - 1) // GEN_BLOCK
    blocks = [_gen_block(params, n_cells, n_peaks, seed, k) for k in range(k0, k1 + 1)]
    full = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
    return full[start - k0 * GEN_BLOCK: stop - k0 * GEN_BLOCK]


def like_obs(p: LikeParams, n_cells: int, seed: int) -> pd.DataFrame:
    """Ground truth per cell: ``celltype`` (the reference's type names)."""
    labels = np.concatenate([_block_cells(p, np.random.default_rng([seed, k]), min(GEN_BLOCK, n_cells - k * GEN_BLOCK))
                             for k in range(-(-n_cells // GEN_BLOCK))])
    width = len(str(n_cells - 1))
    obs = pd.DataFrame(index=pd.Index([f"cell{i:0{width}d}" for i in range(n_cells)]))
    obs["celltype"] = pd.Categorical.from_codes(labels, list(p.types))
    return obs


def like_var(p: LikeParams, n_peaks: int, seed: int) -> pd.DataFrame:
    """Peaks of the reference's median width, spread over its chromosomes as its peaks were."""
    rng = np.random.default_rng([seed, 0xBED])
    per = np.floor(p.chrom_share * n_peaks).astype(int)
    per[np.argsort(-p.chrom_share)[: n_peaks - per.sum()]] += 1
    chrom, start = [], []
    for c, n, span in zip(p.chroms, per, p.chrom_span):
        if n == 0:
            continue
        step = max(2 * p.peak_width, int(span) // n)
        gaps = rng.integers(p.peak_width + 1, 2 * step - p.peak_width, n) if step > p.peak_width + 1 \
            else np.full(n, p.peak_width + 1)
        chrom.append(np.full(n, c, dtype=object))
        start.append(np.cumsum(gaps))
    start = np.concatenate(start).astype(np.int64)
    return peak_var(np.concatenate(chrom), start, start + p.peak_width, f"peaks like {p.name}")


def synthesize_like(out: str | Path, like: str | Path | LikeParams, *, n_cells: int, n_peaks: int | None = None,
                    seed: int = 0, chunk_rows: int | None = None, overwrite: bool = False, client=None,
                    progress: bool = True):
    """Generate ``n_cells`` x ``n_peaks`` cells like a reference straight into a store.

    ``like``: a preset (``"mouse"``, ``"human"``), a parameter file or a labelled store
    (:func:`load_like`). ``n_peaks`` defaults to the reference's number of peaks.

    Writes
    ------
    A new store: ``X`` (counts), ``obs['celltype']``, ``var`` (``chr``, ``start``, ``end``),
    ``uns/scatac_dist/synth`` (the parameters' name, fingerprint and reference, the sizes,
    the seed).
    """
    from . import _config
    from .io.writer import BlockPlan, write_atlas

    p = load_like(like)
    n_peaks = int(n_peaks or p.n_ref_peaks)
    if n_cells < 1 or n_peaks < 10:
        raise ValueError(f"need n_cells >= 1 and n_peaks >= 10, not {n_cells} x {n_peaks}")
    chunk_rows = int(chunk_rows or _config.get("store.chunk-rows"))
    recipes = [(generate_like_rows, (p, n_cells, n_peaks, seed, s, min(s + chunk_rows, n_cells)))
               for s in range(0, n_cells, chunk_rows)]
    obs, var = like_obs(p, n_cells, seed), {"X": like_var(p, n_peaks, seed)}
    plan = BlockPlan(source=Path(f"like:{p.name}"), obs=obs, var=var, recipes=recipes)
    prov = {"like": p.name, "fingerprint": p.fingerprint, "reference": p.reference, "n_cells": n_cells,
            "n_peaks": n_peaks, "seed": seed, "chunk_rows": chunk_rows}
    return write_atlas(out, [plan], obs=obs, var=var, client=client, overwrite=overwrite,
                       provenance={"params": prov, "chunk_rows": chunk_rows}, stage="synth", progress=progress)


# --------------------------------------------------------------------------- validation


def qc_summary(X: sp.spmatrix) -> dict[str, Any]:
    """The QC distributions a generated atlas is compared on: quartiles of depth (counts per
    cell), open peaks per cell and cells per peak (over peaks open in >= 1 cell, and the share
    of such peaks), and the fraction of zero entries."""
    X = sp.csr_matrix(X)
    depth = np.asarray(X.sum(1)).ravel()
    per_cell = np.diff(X.indptr)
    per_peak = np.bincount(X.indices, minlength=X.shape[1])
    seen = per_peak[per_peak > 0]
    q = (0.25, 0.5, 0.75)
    return {"depth": np.quantile(depth, q).tolist(), "peaks_per_cell": np.quantile(per_cell, q).tolist(),
            "cells_per_peak": np.quantile(seen, q).tolist() if seen.size else [0, 0, 0],
            "cells_per_peak_over_cells": (np.quantile(seen, q) / X.shape[0]).tolist() if seen.size else [0, 0, 0],
            "peaks_seen": float(seen.size / X.shape[1]),
            "fraction_zeros": float(1 - X.nnz / (X.shape[0] * X.shape[1]))}


def compare_qc(ref: dict[str, Any], gen: dict[str, Any]) -> dict[str, float]:
    """Relative differences ``gen / ref - 1`` of each QC quartile (largest in absolute value
    per distribution), and the absolute difference of the zero fractions."""
    out = {}
    for k in ("depth", "peaks_per_cell", "cells_per_peak_over_cells"):
        r, g = np.asarray(ref[k], float), np.asarray(gen[k], float)
        rel = g / np.maximum(r, 1e-12) - 1
        out[k] = float(rel[np.argmax(np.abs(rel))])
    out["peaks_seen"] = gen["peaks_seen"] - ref["peaks_seen"]
    out["fraction_zeros"] = gen["fraction_zeros"] - ref["fraction_zeros"]
    return out
