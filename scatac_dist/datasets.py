"""Synthetic scATAC atlases with known labels, written block by block into a store.

The one data factory of tests, the demo and the benchmarks.

Model (all parameters in :class:`SynthParams`):

* Peaks have a background accessibility ``b_j`` (log-normal: a few peaks are open in most
  cells, most are rare), laid out along chr1..chr22 as 500 bp intervals.
* Cell types form a two-level hierarchy: ``n_lineages`` lineages, each with its own set of
  specific peaks, and ``n_clusters`` types spread over them, each with its own set.
  Types of one lineage share the lineage's peaks, so they are harder to tell apart.
* A cell draws ``depth ~ LogNormal(log(fragments), depth_sigma)`` fragments. A share
  ``s_i ~ Beta`` with mean ``signal`` of them falls in its type's and lineage's specific
  peaks (weighted by ``b``); the rest fall on the shared background. ``signal`` is the
  knob of difficulty: the default leaves a standard LSI + Leiden pipeline well short of
  ARI 1 (see tests/test_datasets.py).
* Batches (optional) scale the background of each peak by ``exp(N(0, batch_effect))``
  and shift depth, as library preparation does.
* **Joint RNA + ATAC** (``n_genes > 0``): the same cells also get gene counts, written as a
  MuData store (``mod/rna``, ``mod/atac``). Genes have a log-normal base abundance; each
  type raises its own ``marker_fraction`` of the genes, and its lineage's, by ``exp(marker_fold)``
  (types of one lineage share half their markers). A cell draws ``UMIs ~ LogNormal(log(umis),
  depth_sigma)`` and counts ``~ NB(mean UMIs x p_type, rna_dispersion)`` (Gamma-Poisson):
  the shared cell types are what both modalities carry.

Determinism: cells are generated in fixed blocks of :data:`GEN_BLOCK` cells, block ``k``
from ``default_rng([seed, k])``, so the atlas depends on the seed alone, never on the store's
chunking or the number of workers.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .io.features import peak_var
from .io.writer import BlockPlan, write_atlas
from .store import Atlas

logger = logging.getLogger("scatac_dist")

__all__ = ["SynthParams", "synthesize", "synthesize_like", "generate_rows", "synth_obs", "synth_var", "synth_genes", "repeak"]

GEN_BLOCK = 1024
_CHROM_SIZES_MB = [249, 242, 198, 190, 181, 171, 159, 145, 138, 134, 135, 133, 114, 107, 102,
                   90, 83, 80, 59, 64, 47, 51]


@dataclass(frozen=True)
class SynthParams:
    """Parameters of a synthetic atlas; see the module docstring for the model."""

    n_cells: int = 50_000
    n_peaks: int = 100_000
    n_clusters: int = 10
    n_lineages: int = 3
    fragments: float = 1000.0
    depth_sigma: float = 0.5
    signal: float = 0.25
    signal_concentration: float = 8.0
    specific_fraction: float = 0.02
    lineage_fraction: float = 0.03
    n_batches: int = 1
    batch_effect: float = 0.0
    seed: int = 0
    n_genes: int = 0
    umis: float = 1500.0
    marker_fraction: float = 0.03
    marker_fold: float = 1.5
    rna_dispersion: float = 2.0

    def __post_init__(self):
        if self.n_cells < 1 or self.n_peaks < 10:
            raise ValueError("need n_cells >= 1 and n_peaks >= 10")
        if not 0 <= self.signal <= 1:
            raise ValueError(f"signal must be in [0, 1], not {self.signal}")
        if self.n_clusters < 1 or self.n_lineages < 1 or self.n_lineages > self.n_clusters:
            raise ValueError("need 1 <= n_lineages <= n_clusters")
        if self.n_batches < 1:
            raise ValueError("n_batches must be >= 1")
        if self.n_genes < 0 or (self.n_genes and self.n_genes < 10):
            raise ValueError("n_genes must be 0 (ATAC only) or >= 10")
        if self.rna_dispersion <= 0:
            raise ValueError(f"rna_dispersion must be > 0, not {self.rna_dispersion}")


@dataclass(frozen=True)
class _Model:
    proportions: np.ndarray  # (n_clusters,)
    lineage_of: np.ndarray  # (n_clusters,)
    bg_cdf: np.ndarray  # (n_batches, n_peaks) cumulative background weights
    spec_cdf: np.ndarray  # (n_clusters, n_peaks) cumulative specific weights
    batch_depth: np.ndarray  # (n_batches,) depth multipliers


@lru_cache(maxsize=4)
def _model(p: SynthParams) -> _Model:
    """Global parameters, derived from the seed alone (cached per worker process)."""
    rng = np.random.default_rng([p.seed, 0x5CA7AC])
    base = rng.lognormal(0.0, 1.0, p.n_peaks)
    proportions = rng.dirichlet(np.full(p.n_clusters, 3.0))
    lineage_of = np.sort(np.concatenate([np.arange(p.n_lineages),
                                         rng.integers(0, p.n_lineages, p.n_clusters - p.n_lineages)]))
    n_spec = max(1, int(p.specific_fraction * p.n_peaks))
    n_lin = max(1, int(p.lineage_fraction * p.n_peaks))
    lineage_sets = [rng.choice(p.n_peaks, n_lin, replace=False) for _ in range(p.n_lineages)]
    spec = np.zeros((p.n_clusters, p.n_peaks))
    for c in range(p.n_clusters):
        own = rng.choice(p.n_peaks, n_spec, replace=False)
        spec[c, own] += base[own]
        # half of a type's informative reads come from its lineage's shared peaks
        lin = lineage_sets[lineage_of[c]]
        spec[c, lin] += base[lin] * (n_spec / n_lin)
    spec /= spec.sum(axis=1, keepdims=True)
    bg = np.empty((p.n_batches, p.n_peaks))
    for b in range(p.n_batches):
        scale = np.exp(rng.normal(0.0, p.batch_effect, p.n_peaks)) if p.batch_effect else 1.0
        bg[b] = base * scale
    bg /= bg.sum(axis=1, keepdims=True)
    batch_depth = np.exp(rng.normal(0.0, p.batch_effect / 2, p.n_batches)) if p.batch_effect \
        else np.ones(p.n_batches)
    return _Model(proportions, lineage_of, np.cumsum(bg, axis=1), np.cumsum(spec, axis=1),
                  batch_depth)


def _block_labels(p: SynthParams, m: _Model, rng: np.random.Generator, n: int):
    # Drawn first from each block's stream, so obs can be built without the counts.
    labels = rng.choice(p.n_clusters, size=n, p=m.proportions)
    batch = rng.integers(0, p.n_batches, size=n)
    return labels, batch


def _gen_block(p: SynthParams, k: int) -> sp.csr_matrix:
    m = _model(p)
    n = min(GEN_BLOCK, p.n_cells - k * GEN_BLOCK)
    rng = np.random.default_rng([p.seed, k])
    labels, batch = _block_labels(p, m, rng, n)
    depth = np.maximum(1, np.rint(rng.lognormal(np.log(p.fragments), p.depth_sigma, n)
                                  * m.batch_depth[batch])).astype(np.int64)
    a = p.signal * p.signal_concentration
    b = (1 - p.signal) * p.signal_concentration
    share = rng.beta(a, b, n) if 0 < p.signal < 1 else np.full(n, p.signal)
    n_spec = rng.binomial(depth, share)
    n_bg = depth - n_spec
    cells, peaks = [], []
    for c in range(p.n_clusters):
        idx = np.flatnonzero(labels == c)
        if idx.size:
            tot = n_spec[idx]
            cells.append(np.repeat(idx, tot))
            peaks.append(np.searchsorted(m.spec_cdf[c], rng.random(int(tot.sum())) * m.spec_cdf[c, -1]))
    for bt in range(p.n_batches):
        idx = np.flatnonzero(batch == bt)
        if idx.size:
            tot = n_bg[idx]
            cells.append(np.repeat(idx, tot))
            peaks.append(np.searchsorted(m.bg_cdf[bt], rng.random(int(tot.sum())) * m.bg_cdf[bt, -1]))
    cells = np.concatenate(cells)
    peaks = np.minimum(np.concatenate(peaks), p.n_peaks - 1)
    key, counts = np.unique(cells.astype(np.int64) * p.n_peaks + peaks, return_counts=True)
    return sp.csr_matrix((counts.astype(np.uint32), (key // p.n_peaks, key % p.n_peaks)),
                         shape=(n, p.n_peaks))


@lru_cache(maxsize=4)
def _rna_model(p: SynthParams) -> np.ndarray:
    """Each type's expected share of UMIs per gene (n_clusters x n_genes), from the seed alone."""
    m = _model(p)
    rng = np.random.default_rng([p.seed, 0x24A])
    base = rng.lognormal(0.0, 1.5, p.n_genes)
    n_mark = max(1, int(p.marker_fraction * p.n_genes))
    lineage_marks = [rng.choice(p.n_genes, n_mark, replace=False) for _ in range(p.n_lineages)]
    logfold = np.zeros((p.n_clusters, p.n_genes))
    for c in range(p.n_clusters):
        logfold[c, rng.choice(p.n_genes, n_mark, replace=False)] += p.marker_fold
        logfold[c, lineage_marks[m.lineage_of[c]]] += p.marker_fold
    expr = base * np.exp(logfold)
    return expr / expr.sum(axis=1, keepdims=True)


def _gen_rna_block(p: SynthParams, k: int) -> sp.csr_matrix:
    n = min(GEN_BLOCK, p.n_cells - k * GEN_BLOCK)
    labels, _ = _block_labels(p, _model(p), np.random.default_rng([p.seed, k]), n)  # the ATAC block's types
    rng = np.random.default_rng([p.seed, k, 0x24A])
    umis = rng.lognormal(np.log(p.umis), p.depth_sigma, n)
    mean = umis[:, None] * _rna_model(p)[labels]
    theta = p.rna_dispersion
    counts = rng.poisson(rng.gamma(theta, mean / theta))
    return sp.csr_matrix(counts.astype(np.uint32))


def generate_rows(params: dict | SynthParams, start: int, stop: int) -> sp.csr_matrix | dict[str, sp.csr_matrix]:
    """Counts of cells ``[start, stop)`` as CSR (with genes: ``{"rna": .., "atac": ..}``); the
    same whatever range is asked for."""
    p = params if isinstance(params, SynthParams) else SynthParams(**params)
    k0, k1 = start // GEN_BLOCK, (stop - 1) // GEN_BLOCK
    off = k0 * GEN_BLOCK

    def rows(gen):
        blocks = [gen(p, k) for k in range(k0, k1 + 1)]
        full = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
        return full[start - off: stop - off]

    if not p.n_genes:
        return rows(_gen_block)
    return {"rna": rows(_gen_rna_block), "atac": rows(_gen_block)}


def synth_genes(p: SynthParams) -> pd.DataFrame:
    """The genes of a joint atlas (``gene0000``...), with ``gene_ids`` and ``feature_types``."""
    names = [f"gene{g:0{len(str(max(p.n_genes - 1, 0)))}d}" for g in range(p.n_genes)]
    return pd.DataFrame({"gene_ids": names, "feature_types": "Gene Expression"}, index=pd.Index(names))


def synth_obs(p: SynthParams) -> pd.DataFrame:
    """Ground truth per cell: ``celltype``, ``lineage`` and (with batches) ``batch``."""
    m = _model(p)
    labels, batches = [], []
    for k in range(-(-p.n_cells // GEN_BLOCK)):
        n = min(GEN_BLOCK, p.n_cells - k * GEN_BLOCK)
        lab, bt = _block_labels(p, m, np.random.default_rng([p.seed, k]), n)
        labels.append(lab)
        batches.append(bt)
    labels = np.concatenate(labels)
    width = len(str(p.n_cells - 1))
    obs = pd.DataFrame(index=pd.Index([f"cell{i:0{width}d}" for i in range(p.n_cells)]))
    obs["celltype"] = pd.Categorical.from_codes(labels, [f"type{c}" for c in range(p.n_clusters)])
    obs["lineage"] = pd.Categorical.from_codes(m.lineage_of[labels],
                                               [f"lineage{c}" for c in range(p.n_lineages)])
    if p.n_batches > 1:
        obs["batch"] = pd.Categorical.from_codes(np.concatenate(batches),
                                                 [f"batch{b}" for b in range(p.n_batches)])
    return obs


def synth_var(p: SynthParams) -> pd.DataFrame:
    """Peaks as 500 bp intervals spread over chr1..chr22 by chromosome length."""
    rng = np.random.default_rng([p.seed, 0xBED])
    sizes = np.array(_CHROM_SIZES_MB, dtype=float)
    per_chr = np.floor(sizes / sizes.sum() * p.n_peaks).astype(int)
    per_chr[: p.n_peaks - per_chr.sum()] += 1
    chrom, start = [], []
    for i, n in enumerate(per_chr):
        if n == 0:
            continue
        span = int(sizes[i] * 1e6)
        gaps = rng.integers(500, max(1000, span // max(n, 1)), n)
        pos = 10_000 + np.cumsum(gaps)
        chrom.append(np.full(n, f"chr{i + 1}", dtype=object))
        start.append(pos)
    start = np.concatenate(start).astype(np.int64)
    return peak_var(np.concatenate(chrom), start, start + 500, "synthetic peaks")


def synthesize(out: str | Path, params: SynthParams | None = None, *, chunk_rows: int | None = None,
               overwrite: bool = False, client=None, progress: bool = True) -> Atlas:
    """Generate a synthetic atlas straight into a store, one row block per worker task.

    Writes
    ------
    A new store: ``X`` (counts), ``obs`` (``celltype``, ``lineage``, ``batch``), ``var``
    (``chr``, ``start``, ``end``), ``uns/scatac_dist/synth`` (the parameters). With
    ``n_genes > 0`` a MuData store instead: ``mod/rna`` (gene counts) and ``mod/atac`` (the
    peaks above), the same cells and ``obs`` in both.
    """
    from . import _config

    p = params or SynthParams()
    chunk_rows = int(chunk_rows or _config.get("store.chunk-rows"))
    pd_ = asdict(p)
    recipes = [(generate_rows, (pd_, s, min(s + chunk_rows, p.n_cells)))
               for s in range(0, p.n_cells, chunk_rows)]
    obs, var = synth_obs(p), synth_var(p)
    var = {"rna": synth_genes(p), "atac": var} if p.n_genes else {"X": var}
    plan = BlockPlan(source=Path("synthetic"), obs=obs, var=var, recipes=recipes)
    return write_atlas(out, [plan], obs=obs, var=var, client=client, overwrite=overwrite,
                       provenance={"params": pd_, "chunk_rows": chunk_rows}, stage="synth",
                       progress=progress)


def repeak(X: sp.spmatrix, var: pd.DataFrame, *, seed: int = 0, max_shift: int = 100,
           merge_fraction: float = 0.1) -> tuple[sp.csr_matrix, pd.DataFrame, np.ndarray]:
    """The same cells as a new peak call would see them (scEmbed's transfer test).

    Every peak moves by its own random shift in ``[-max_shift, max_shift]`` bp, then a share
    ``merge_fraction`` of the peaks is merged with the next peak on the same chromosome
    (no peak takes part in two merges); a merged peak spans both and sums their counts.

    Parameters
    ----------
    X
        Cells x peaks counts.
    var
        The peaks, with ``chr``, ``start``, ``end``.

    Returns
    -------
    X_new, var_new, origin
        The new counts and peaks (sorted by chromosome and start), and for each old peak the
        index of the new peak it went into.
    """
    rng = np.random.default_rng([seed, 0x5E1F])
    chrom = var["chr"].astype(str).to_numpy()
    start = var["start"].to_numpy(np.int64)
    end = var["end"].to_numpy(np.int64)
    shift = rng.integers(-max_shift, max_shift + 1, len(var))
    shift = np.maximum(shift, -start)  # keep starts >= 0
    start, end = start + shift, end + shift
    order = np.lexsort((start, chrom))
    same_next = np.zeros(len(var), bool)
    same_next[:-1] = chrom[order][:-1] == chrom[order][1:]
    cand = rng.permutation(np.flatnonzero(same_next))
    taken = np.zeros(len(var) + 1, bool)
    merge_with_next = np.zeros(len(var), bool)
    n_merge = int(round(merge_fraction * len(var)))
    for i in cand:  # greedy: a position whose neighbours are free starts a merge
        if n_merge == 0:
            break
        if not (taken[i] or taken[i + 1]):
            taken[i] = taken[i + 1] = True
            merge_with_next[i] = True
            n_merge -= 1
    # new peak number of each sorted position: a merge's second member joins the first
    starts_new = np.ones(len(var), bool)
    starts_new[1:] = ~merge_with_next[:-1]
    new_of_sorted = np.cumsum(starts_new) - 1
    origin = np.empty(len(var), np.int64)
    origin[order] = new_of_sorted
    n_new = int(new_of_sorted[-1]) + 1 if len(var) else 0
    new_start = np.full(n_new, np.iinfo(np.int64).max)
    new_end = np.zeros(n_new, np.int64)
    np.minimum.at(new_start, origin, start)
    np.maximum.at(new_end, origin, end)
    new_chr = np.empty(n_new, dtype=object)
    new_chr[origin] = chrom
    G = sp.csr_matrix((np.ones(len(var), np.float32), (np.arange(len(var)), origin)), shape=(len(var), n_new))
    X_new = sp.csr_matrix(sp.csr_matrix(X) @ G)
    return X_new, peak_var(new_chr, new_start, new_end, "re-called peaks"), origin


def synthesize_like(out: str | Path, like, *, n_cells: int, n_peaks: int | None = None, seed: int = 0,
                    chunk_rows: int | None = None, overwrite: bool = False, client=None,
                    progress: bool = True) -> Atlas:
    """Cells like a real reference (a preset ``"mouse"``/``"human"``, a parameter file or a
    labelled store): see :func:`scatac_dist.calibrated.synthesize_like`."""
    from .calibrated import synthesize_like as _like

    return _like(out, like, n_cells=n_cells, n_peaks=n_peaks, seed=seed, chunk_rows=chunk_rows,
                 overwrite=overwrite, client=client, progress=progress)
