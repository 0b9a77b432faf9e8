"""Multiome peer runner: joint RNA+ATAC embeddings from MultiVI, muon's WNN and MOFA+.

The peers the benchmark compares its joint (multiome) embeddings against, each run in a
process of its own on one 10x Cell Ranger ARC HDF5 file (``Gene Expression`` and ``Peaks``
features of the same cells), in the venv of ``make bench-multiome-install``
(``benchmarks/work/multiome-venv``: scvi-tools 1.4.2, muon 0.1.9, mofapy2 0.7.5,
scanpy 1.11.5, torch 2.13.0 CPU). Every option not named below keeps the peer's own
default; the JSON records the options passed and the installed versions.

Cells: the metadata rows whose label (``--label-col``, default ``cluster (remapped)``) is
not ``Mis`` (``--drop-label``), in the metadata's barcode order, intersected with the
HDF5's barcodes (SNARE MOp: 9,190 of 10,309 cells, 14 classes). The HDF5 is read with
``muon.read_10x_h5`` (modalities ``rna``: raw UMI counts, ``atac``: raw peak counts); no
feature is filtered out (SNARE MOp: 1,677 genes, a preselected subset, and 25,734 peaks),
except for MOFA+'s peak subset (below).

Methods
-------
``multivi``
    scvi-tools MultiVI as its 1.4 docs set it up (``setup_anndata`` is gone in 1.4:
    "Please use setup_mudata instead")::

        scvi.settings.seed = S
        mdata = MuData({"rna": rna_counts, "atac": atac_counts})   # genes first
        MULTIVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "atac_layer": "atac"})
        model = MULTIVI(mdata, n_genes=1677, n_regions=25734)
        model.train(max_epochs=..., accelerator="cpu", enable_progress_bar=False)
        X_multivi = model.get_latent_representation()

    Defaults kept: ``n_hidden`` = min(128, sqrt(n_regions)) (128), ``n_latent`` =
    sqrt(n_hidden) (11), 2+2 layers, ZINB genes, ``modality_weights="equal"``, Jeffreys
    penalty; ``train``: lr 1e-4, AdamW, batch 128, 90/10 train/validation split, KL warm-up 50
    epochs, early stopping on ``reconstruction_loss_validation`` with patience 50.
    The tutorial's filter (features in < 1 % of cells) is not applied: every model sees
    the same features.

    Epoch budget: measured here (2 torch threads on a 2-core machine shared with another
    job, 9,190 cells, 65 training batches of 128 per epoch) 147 s per epoch (3-epoch probe)
    and 160.5 s per epoch (the 6-epoch run), so scvi's default (``max_epochs=500``, early
    stopping with patience 50) would take up to ~22 h, and even its 50-epoch KL warm-up
    ~2.2 h. The runner's default is therefore ``--max-epochs 6`` (~16 min here), with
    early stopping left on (it cannot trigger within 6 epochs). This is an undertrained
    MultiVI (KL weight only ramped to 6/50, lr 1e-4): a CPU-budget peer, not MultiVI at
    convergence; ``--max-epochs 500`` restores scvi's default (a GPU makes that
    practical). ``enable_progress_bar=False`` only silences the log. Output
    ``X_multivi.npy`` (cells x 11, float32; the posterior means).

``wnn``
    muon's weighted nearest neighbours (Hao et al. 2021), as in muon's multiome tutorial::

        RNA:  sc.pp.normalize_total(target_sum=1e4); sc.pp.log1p; sc.pp.scale(max_value=10)
              sc.pp.pca(n_comps=30, random_state=S)               # all 1,677 genes
              sc.pp.neighbors(use_rep="X_pca", random_state=S)
        ATAC: mu.atac.pp.tfidf (defaults: log_tf, log_idf, scale_factor 1e4)
              mu.atac.tl.lsi(n_comps=30); X_lsi = X_lsi[:, 1:]    # 29 components: the
                                                                  # first is depth-correlated
              sc.pp.neighbors(use_rep="X_lsi", random_state=S)
        mu.pp.neighbors(mdata, key_added="wnn", random_state=S)
        mu.tl.umap(mdata, neighbors_key="wnn", random_state=S)
        sc.tl.leiden(mdata, neighbors_key="wnn", resolution=1, random_state=S)

    Defaults kept: ``sc.pp.neighbors`` 15 neighbours, euclidean, umap connectivities;
    ``mu.pp.neighbors`` n_neighbors = mean of the modalities' (15), 20 bandwidth and 200
    multimodal neighbours, euclidean; ``mu.tl.umap`` min_dist 0.5, 2 components;
    scanpy 1.11's leiden (leidenalg flavour, ``n_iterations=-1``). muon's LSI uses an
    unseeded ARPACK start vector: ``numpy.random.seed(S)`` is set first. Outputs
    ``wnn_connectivities.npz`` (cells x cells CSR, ``scipy.sparse.save_npz``),
    ``X_rna_pca.npy``, ``X_atac_lsi.npy``, ``X_wnn_umap.npy`` (the embedding a k-means
    protocol clusters), ``leiden_wnn.tsv`` (``obs_name``, ``leiden``).

``mofa``
    MOFA+ through muon (``mu.tl.mofa``, mofapy2) on RNA (``normalize_total(1e4)`` +
    ``log1p``, all 1,677 genes) and ATAC (``mu.atac.pp.tfidf``, muon's defaults; the 2,000
    peaks detected in the most cells, ``--mofa-peaks``)::

        mu.tl.mofa(mdata, n_factors=15, use_var="highly_variable", seed=S, gpu_mode=False,
                   outfile=<scratch in OUTDIR, deleted afterwards>)

    Defaults kept: gaussian likelihoods, ``n_iterations=1000``,
    ``convergence_mode="fast"``, ARD and spike-and-slab on the weights, no view scaling,
    float64. Output ``X_mofa.npy`` (cells x factors; MOFA+ may drop inactive factors).
    Peaks: with all 25,734 peaks one MOFA+ iteration took ~57 s here (7.5 GB RSS), far
    too slow for the default 1,000 iterations, so the ATAC view is the 2,000 peaks with a
    nonzero count in the most cells (ties in file order), flagged ``highly_variable``
    (muon's default ``use_var``; every gene is flagged too). 15 factors: with these,
    an iteration takes ~7.5 s and the seed-0 fit converged (``fast`` mode) at iteration
    66 in ~8.5 min.

Every method also writes ``result.json`` (method, seed, versions of the peer packages,
options, ``times_s`` per step and ``total``, ``peak_rss_bytes`` from
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, ``n_cells``, feature counts) and
``obs_names.txt`` (the cells, in the row order of every output).

``--threads T`` sets ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS``/
``NUMBA_NUM_THREADS`` before the imports and ``torch.set_num_threads(T)``.

Usage::

    benchmarks/work/multiome-venv/bin/python benchmarks/multiome_peers_runner.py \\
        H5 METADATA OUTDIR --method multivi|wnn|mofa --seed S [--max-epochs N] [--threads T]

Self-contained: imports neither ``scatac_dist`` nor ``benchmarks/harness``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

DEFAULT_MAX_EPOCHS = 6  # the measured ~15-minute CPU budget (see the docstring)
MOFA_N_FACTORS = 15
MOFA_N_PEAKS = 2000


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("h5")
    p.add_argument("metadata")
    p.add_argument("outdir")
    p.add_argument("--method", required=True, choices=["multivi", "wnn", "mofa"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-epochs",
        type=int,
        default=DEFAULT_MAX_EPOCHS,
        help=f"MultiVI epoch cap (early stopping stays on; default {DEFAULT_MAX_EPOCHS})",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--mofa-peaks",
        type=int,
        default=MOFA_N_PEAKS,
        help=f"MOFA: the N most often detected peaks (0: all; default {MOFA_N_PEAKS})",
    )
    p.add_argument("--label-col", default="cluster (remapped)")
    p.add_argument("--drop-label", default="Mis")
    return p.parse_args(argv)


args = _parse()
if args.threads:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)

import importlib.metadata as _md  # noqa: E402
import random  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

T_PROCESS = time.perf_counter()
times: dict[str, float] = {}


class step:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        times[self.name] = round(time.perf_counter() - self.t, 3)
        print(f"[{args.method}] {self.name}: {times[self.name]:.1f} s", flush=True)


def versions(names):
    out = {}
    for n in names:
        try:
            out[n] = _md.version(n)
        except _md.PackageNotFoundError:
            out[n] = None
    return out


os.makedirs(args.outdir, exist_ok=True)
random.seed(args.seed)
np.random.seed(args.seed)

with step("import"):
    import muon as mu
    import scanpy as sc
    from mudata import MuData

    if args.method == "multivi":
        import scvi
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
    if args.method == "mofa":
        import mofapy2  # noqa: F401

with step("load"):
    meta = pd.read_csv(args.metadata, sep="\t")
    meta = meta[meta[args.label_col].astype(str) != args.drop_label]
    mdata = mu.read_10x_h5(args.h5)
    in_h5 = set(mdata.obs_names)
    cells = [b for b in meta["barcode"].astype(str) if b in in_h5]
    rna = mdata.mod["rna"][cells].copy()
    atac = mdata.mod["atac"][cells].copy()
    del mdata
    for a in (rna, atac):
        a.X = sp.csr_matrix(a.X, dtype=np.float32)
        a.var_names_make_unique()

n_cells = len(cells)
with open(os.path.join(args.outdir, "obs_names.txt"), "w") as fh:
    fh.write("\n".join(cells) + "\n")
options: dict = {}
extra: dict = {}

if args.method == "multivi":
    with step("setup"):
        scvi.settings.seed = args.seed
        mdata = MuData({"rna": rna, "atac": atac})
        scvi.model.MULTIVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "atac_layer": "atac"})
        model = scvi.model.MULTIVI(mdata, n_genes=rna.n_vars, n_regions=atac.n_vars)
    with step("train"):
        model.train(max_epochs=args.max_epochs, accelerator="cpu", enable_progress_bar=False)
    with step("latent"):
        Z = model.get_latent_representation()
    np.save(os.path.join(args.outdir, "X_multivi.npy"), Z)
    hist = model.history
    n_epochs = len(hist["reconstruction_loss_train"]) if "reconstruction_loss_train" in hist else None
    extra = {
        "epochs_trained": n_epochs,
        "seconds_per_epoch": round(times["train"] / n_epochs, 3) if n_epochs else None,
        "stopped_early": bool(n_epochs is not None and n_epochs < args.max_epochs),
        "n_hidden": int(model.module.n_hidden),
        "n_latent": int(model.module.n_latent),
        "shape": list(Z.shape),
    }
    options = {
        "setup_mudata": {"modalities": {"rna_layer": "rna", "atac_layer": "atac"}},
        "MULTIVI": {"n_genes": rna.n_vars, "n_regions": atac.n_vars},
        "train": {
            "max_epochs": args.max_epochs,
            "accelerator": "cpu",
            "early_stopping": True,
            "enable_progress_bar": False,
        },
        "scvi.settings.seed": args.seed,
        "torch_threads": torch.get_num_threads(),
    }
    pkgs = ["scvi-tools", "torch", "lightning", "muon", "mudata", "anndata", "scanpy", "numpy", "scipy"]

elif args.method == "wnn":
    with step("rna"):
        sc.pp.normalize_total(rna, target_sum=1e4)
        sc.pp.log1p(rna)
        sc.pp.scale(rna, max_value=10)
        sc.pp.pca(rna, n_comps=30, random_state=args.seed)
        sc.pp.neighbors(rna, use_rep="X_pca", random_state=args.seed)
    with step("atac"):
        mu.atac.pp.tfidf(atac)
        mu.atac.tl.lsi(atac, n_comps=30)
        atac.obsm["X_lsi"] = np.ascontiguousarray(atac.obsm["X_lsi"][:, 1:])
        atac.varm["LSI"] = atac.varm["LSI"][:, 1:]
        sc.pp.neighbors(atac, use_rep="X_lsi", random_state=args.seed)
    with step("wnn"):
        mdata = MuData({"rna": rna, "atac": atac})
        mu.pp.neighbors(mdata, key_added="wnn", random_state=args.seed)
    with step("umap"):
        mu.tl.umap(mdata, neighbors_key="wnn", random_state=args.seed)
    with step("leiden"):
        try:
            sc.tl.leiden(
                mdata, neighbors_key="wnn", resolution=1, random_state=args.seed, key_added="leiden_wnn"
            )
            leiden = mdata.obs["leiden_wnn"].astype(str).values
        except Exception as e:  # not essential: record and go on
            leiden = None
            extra["leiden_error"] = f"{type(e).__name__}: {e}"
    conn = sp.csr_matrix(mdata.obsp["wnn_connectivities"])
    sp.save_npz(os.path.join(args.outdir, "wnn_connectivities.npz"), conn)
    np.save(os.path.join(args.outdir, "X_rna_pca.npy"), rna.obsm["X_pca"])
    np.save(os.path.join(args.outdir, "X_atac_lsi.npy"), atac.obsm["X_lsi"])
    np.save(os.path.join(args.outdir, "X_wnn_umap.npy"), mdata.obsm["X_umap"])
    if leiden is not None:
        pd.DataFrame({"obs_name": cells, "leiden": leiden}).to_csv(
            os.path.join(args.outdir, "leiden_wnn.tsv"), sep="\t", index=False
        )
        extra["n_leiden_clusters"] = int(len(set(leiden)))
    extra["wnn_nnz"] = int(conn.nnz)
    extra["shapes"] = {
        "X_rna_pca": list(rna.obsm["X_pca"].shape),
        "X_atac_lsi": list(atac.obsm["X_lsi"].shape),
        "X_wnn_umap": list(mdata.obsm["X_umap"].shape),
    }
    options = {
        "rna": {
            "normalize_total": {"target_sum": 1e4},
            "log1p": {},
            "scale": {"max_value": 10},
            "pca": {"n_comps": 30, "random_state": args.seed},
            "neighbors": {"use_rep": "X_pca", "random_state": args.seed},
        },
        "atac": {
            "tfidf": {},
            "lsi": {"n_comps": 30},
            "drop_first_lsi_component": True,
            "neighbors": {"use_rep": "X_lsi", "random_state": args.seed},
        },
        "mu.pp.neighbors": {"key_added": "wnn", "random_state": args.seed},
        "mu.tl.umap": {"neighbors_key": "wnn", "random_state": args.seed},
        "sc.tl.leiden": {"neighbors_key": "wnn", "resolution": 1, "random_state": args.seed},
        "numpy.random.seed": args.seed,
    }
    pkgs = [
        "muon",
        "mudata",
        "scanpy",
        "anndata",
        "umap-learn",
        "pynndescent",
        "leidenalg",
        "igraph",
        "numpy",
        "scipy",
        "scikit-learn",
    ]

else:  # mofa
    with step("preprocess"):
        # peaks: the N detected in the most cells (raw counts > 0; ties: file order), flagged
        # highly_variable for muon's default use_var; every gene flagged
        det = np.asarray((atac.X > 0).sum(axis=0)).ravel()
        n_peaks = atac.n_vars if args.mofa_peaks <= 0 else min(args.mofa_peaks, atac.n_vars)
        keep = np.zeros(atac.n_vars, dtype=bool)
        keep[np.argsort(-det, kind="stable")[:n_peaks]] = True
        atac.var["highly_variable"] = keep
        rna.var["highly_variable"] = True
        sc.pp.normalize_total(rna, target_sum=1e4)
        sc.pp.log1p(rna)
        mu.atac.pp.tfidf(atac)
        mdata = MuData({"rna": rna, "atac": atac})
        assert int(mdata.var["highly_variable"].astype(bool).sum()) == rna.n_vars + n_peaks
    outfile = os.path.join(args.outdir, "_mofa_scratch.hdf5")
    mofa_opts = {
        "n_factors": MOFA_N_FACTORS,
        "use_var": "highly_variable",
        "seed": args.seed,
        "gpu_mode": False,
        "outfile": "<scratch, deleted>",
    }
    with step("mofa"):
        mu.tl.mofa(
            mdata,
            n_factors=MOFA_N_FACTORS,
            use_var="highly_variable",
            seed=args.seed,
            gpu_mode=False,
            outfile=outfile,
        )
    Z = np.asarray(mdata.obsm["X_mofa"])
    if os.path.exists(outfile):
        os.remove(outfile)
    np.save(os.path.join(args.outdir, "X_mofa.npy"), Z)
    extra = {"shape": list(Z.shape), "n_peaks_used": int(n_peaks)}
    options = {
        "rna": {"normalize_total": {"target_sum": 1e4}, "log1p": {}},
        "atac": {"top_detected_peaks": int(n_peaks), "tfidf": {}},
        "mu.tl.mofa": mofa_opts,
    }
    pkgs = ["mofapy2", "muon", "mudata", "scanpy", "anndata", "h5py", "numpy", "scipy"]

times["total"] = round(sum(v for k, v in times.items() if k not in ("import",)), 3)
times["process"] = round(time.perf_counter() - T_PROCESS, 3)
result = {
    "method": args.method,
    "seed": args.seed,
    "versions": versions(pkgs),
    "python": platform.python_version(),
    "options": options,
    "threads": args.threads,
    "times_s": times,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "n_cells": n_cells,
    "n_genes": int(rna.n_vars),
    "n_peaks": int(atac.n_vars),
    "input": {
        "h5": os.path.abspath(args.h5),
        "metadata": os.path.abspath(args.metadata),
        "label_col": args.label_col,
        "dropped_label": args.drop_label,
    },
    "argv": sys.argv,
    **extra,
}
with open(os.path.join(args.outdir, "result.json"), "w") as fh:
    json.dump(result, fh, indent=2)
print(json.dumps({k: result[k] for k in ("method", "n_cells", "times_s", "peak_rss_bytes")}))
