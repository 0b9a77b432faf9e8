"""scEmbed (LeRoy et al.): word2vec over genomic regions, cell embeddings, projection and
label transfer.

Each cell is a document whose words are its accessible regions (``chr_start_end``), in random
order. gensim's word2vec learns one vector per region; a cell's embedding is the mean of the
vectors of its regions that are in the vocabulary. New data is projected through the
universe of regions by interval overlap, and labelled by its nearest reference cells, then
by a vote within its clusters.

Reads ``X`` (any nonzero is signal), ``var['chr'|'start'|'end']`` and, when present,
``obs['pass_qc']`` (training cells). Writes:

* ``obsm['X_scembed']``: cell embeddings (zeros for a cell without vocabulary regions);
  ``obs['scembed_n_regions']``: universe regions each cell touches;
* with a reference UMAP and ``umap=True`` (EV-projection): ``obsm['X_scembed_umap']``;
* ``annotate``: ``obs['scembed_label']`` (after the cluster vote), ``obs['scembed_confidence']``
  (share of the cell's k reference neighbours that carry that label), ``obs['scembed_cell_label']``
  (the cell's own kNN vote), ``obs['scembed_cluster']`` and ``obs['scembed_confident']``;
* ``uns/scatac_dist/scembed*``: parameters, timings, training and projection summaries.

The defaults followed, the choices where the paper is silent and the measurements behind
them: ``docs/methods/scembed.md``. The parts: corpora in :mod:`.scembed_corpus`, the epoch
loop in :mod:`._scembed_training`, projection and the vote's clusters in
:mod:`._scembed_projection`, the model bundle in :mod:`._scembed_bundle`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from ..lock import store_lock
from ..ops.corpus import MAX_TOKENS, token_keys
from ..ops.label_transfer import cluster_vote, knn_vote
from ..ops.regions import region_words
from ..store import Atlas, open_atlas
from ..train.data import StoreRows
from ._scembed_bundle import read_bundle, write_bundle
from ._scembed_projection import encode_store, fit_umap, hnsw_index, unit, universe_mapping, vote_clusters
from ._scembed_training import EpochState, dask_client, store_peaks, train_epochs
from .scembed_corpus import EpochCorpusWriter, ShuffledCorpus, chunk_doc_freq, shared

logger = logging.getLogger("scatac_dist")

CORPUS_MODES = ("file", "iterable")


@dataclass
class SCEMBED:
    """scEmbed: region embeddings by word2vec, cell embeddings, projection, label transfer.

    Parameters
    ----------
    dim, window, epochs
        Embedding size, context window, passes over the corpus (paper: 100, 5, 100).
    min_count
        A region enters the vocabulary if it is accessible in at least this many training cells.
    alpha, lr_decay, min_alpha
        Learning rate ``alpha * lr_decay^epoch``, not below ``min_alpha`` (0.1, 0.95, 1e-4).
    workers
        gensim training threads (default: the cores of this machine).
    sg, negative
        word2vec flavour: CBOW (``sg=0``, gensim's default) or skip-gram (``sg=1``), and the
        number of negative samples.
    corpus
        ``"file"``: shards written by Dask workers, next epoch written while this one trains;
        ``"iterable"``: a reshuffling iterable read in this process (small data).
    corpus_dir
        Folder for the corpus files (default: a folder in the store's resume folder beside the
        store, ``.<store>.resume/scembed/corpus-*``); must be visible to the workers.
    seed
        Seeds word2vec, the documents' shuffles, the UMAP sample and the clustering.
    labels_key
        ``obs`` column of the training store to keep as reference labels for ``annotate``.
    umap
        Fit a UMAP on the reference embeddings (for EV-projection), on at most
        ``umap_max_cells`` sampled cells.
    umap_max_cells
        Reference cells the UMAP is fitted on; the others are placed with ``transform``.
    hnsw_m
        Links per node of the reference's faiss HNSW index (32).
    max_tokens
        Regions per document: longer cells are split (gensim truncates sentences over 10,000).
    progress
        Show a progress bar over the epochs.

    Attributes
    ----------
    vectors_
        Region vectors (vocabulary x ``dim``), in store peak order.
    universe_
        The vocabulary as regions (``chr``, ``start``, ``end``, ``word``).
    history_
        One record per trained epoch (rate, words, seconds, words/s).
    train_summary_, timings_
        Training summary and seconds per stage.
    reference_, label_names_, reference_codes_, index_, umap_model_, reference_umap_
        With labels: the reference embeddings, their labels, the HNSW index and the UMAP.
    """

    dim: int = 100
    window: int = 5
    epochs: int = 100
    min_count: int = 5
    alpha: float = 0.1
    lr_decay: float = 0.95
    min_alpha: float = 1e-4
    workers: int | None = None
    sg: int = 0
    negative: int = 5
    corpus: str = "file"
    corpus_dir: str | None = None
    seed: int = 0
    labels_key: str | None = None
    umap: bool = True
    umap_max_cells: int = 50_000
    hnsw_m: int = 32
    max_tokens: int = MAX_TOKENS
    progress: bool = True
    history_: list = field(default_factory=list, repr=False)

    # -- training ---------------------------------------------------------------------------

    def epoch_alpha(self, epoch: int) -> float:
        """The learning rate at the start of ``epoch``."""
        return max(self.alpha * self.lr_decay ** epoch, self.min_alpha)

    def train_params(self) -> dict:
        """The parameters a trained model depends on (``workers`` resolved): a resumed run
        continues a saved state only if these are the same."""
        keys = ("dim", "window", "epochs", "min_count", "alpha", "lr_decay", "min_alpha", "sg", "negative",
                "corpus", "seed", "max_tokens")
        return {k: getattr(self, k) for k in keys} | {"workers": int(self.workers or os.cpu_count() or 1)}

    def fit(self, store: str | Path | Atlas, *, mod: str | None = None, encode: bool = True,
            model_out: str | Path | None = None) -> SCEMBED:
        """Train on ``store``'s cells (those with ``obs['pass_qc']`` if present), then encode
        the store into ``obsm['X_scembed']`` (``encode=True``) and, with ``labels_key``, keep
        the labelled cells as the reference for :meth:`annotate`.

        Resumable: after every epoch the model is saved in the store's resume folder
        (:meth:`scatac_dist.store.Atlas.resume_state`); a run killed in training, run again
        with the same parameters on the same store, goes on from the last finished epoch
        (logged as ``resuming from epoch k``). The outputs and the provenance record are
        published together (one :meth:`~scatac_dist.store.Atlas.publishing` block); the
        bundle is saved to ``model_out`` if given; then the restart state is removed.
        With ``workers=1`` a resumed run gives the same vectors, bit for bit, as an
        uninterrupted one; with more gensim threads no two runs are bit-equal (see
        docs/methods/scembed.md, "Resume and determinism").

        Returns
        -------
        SCEMBED
            ``self``, with the fitted attributes set.
        """
        self._check()
        atlas = store if isinstance(store, Atlas) else open_atlas(store, mod=mod)
        with store_lock(atlas.path):  # the restart state belongs to one writer too
            self._fit(atlas, encode=encode, model_out=model_out)
        return self

    def _fit(self, atlas: Atlas, *, encode: bool, model_out: str | Path | None) -> None:
        from gensim.models import Word2Vec

        t_all = time.perf_counter()
        peaks = store_peaks(atlas, "scEmbed training")
        client = dask_client()
        obs = atlas.obs
        cells = obs["pass_qc"].to_numpy(bool) if "pass_qc" in obs else np.ones(atlas.n_obs, bool)
        if self.labels_key is not None and self.labels_key not in obs:
            raise InputError(atlas.path, f"obs has no column {self.labels_key!r}",
                             f"use one of {list(obs.columns)} or omit labels_key")
        if not cells.any():
            raise InputError(atlas.path, "no cells pass QC", "re-run QC with looser thresholds")
        rows = StoreRows(atlas.path, mod=atlas.mod, cells=cells, chunk_rows=atlas.chunk_rows)
        keys = token_keys(rows.n_vars)
        train_params = self.train_params()
        workers = train_params["workers"]
        resume_dir = atlas.resume_state(
            "scembed", train_params | {"cells_sha1": hashlib.sha1(np.packbits(cells).tobytes()).hexdigest()})
        state = EpochState(resume_dir)
        saved = state.load()
        timings = {}

        t0 = time.perf_counter()
        if saved is not None:
            w2v, keep, total_words = saved["model"], saved["keep"], saved["total_words"]
            first_epoch, self.history_, train_before = saved["epochs_done"], saved["history"], saved["train_seconds"]
            logger.info("scembed: resuming from epoch %d of %d (restart state in %s)", first_epoch, self.epochs,
                        resume_dir)
        else:
            # the vocabulary: regions open in >= min_count training cells, counted in one pass
            rows_f = shared(client, rows, "rows")
            parts = [client.submit(chunk_doc_freq, rows_f, k, pure=False,
                                   key=f"scembed-vocab-{k}-{uuid.uuid4().hex[:6]}")
                     for k in range(rows.n_chunks) if rows.chunk_cells[k]]
            df = np.zeros(rows.n_vars, np.int64)
            for f in parts:  # summed in chunk order on the client: n_vars integers each
                df += f.result()
            del parts
            keep = df >= self.min_count
            if not keep.any():
                atlas.clear_resume("scembed")  # nothing to resume: leave nothing beside the store
                raise InputError(atlas.path, f"no region is accessible in >= {self.min_count} cells",
                                 "lower min_count (--min-count)")
            total_words = int(df[keep].sum())
            w2v = Word2Vec(vector_size=self.dim, window=self.window, min_count=1, workers=workers, seed=self.seed,
                           sg=self.sg, negative=self.negative, alpha=self.alpha, min_alpha=self.min_alpha)
            w2v.build_vocab_from_freq({keys[j]: int(df[j]) for j in np.flatnonzero(keep)},
                                      corpus_count=int(rows.n_cells))
            first_epoch, self.history_, train_before = 0, [], 0.0
            state.save(w2v, epochs_done=0, history=[], train_seconds=0.0, keep=keep, total_words=total_words)
        timings["vocabulary"] = time.perf_counter() - t0

        own_dir = self.corpus_dir is None
        if own_dir:
            # beside the store (so the workers see it wherever they run), one folder per run:
            # a killed run's epoch files are removed, and its tasks still running on the
            # workers cannot write into this run's folder
            for old in resume_dir.glob("corpus-*"):
                shutil.rmtree(old, ignore_errors=True)
            folder = resume_dir / f"corpus-{uuid.uuid4().hex[:8]}"
        else:
            folder = Path(self.corpus_dir)
        spent = [train_before]

        def checkpoint(epochs_done: int, seconds: float) -> None:
            spent[0] += seconds
            state.save(w2v, epochs_done=epochs_done, history=self.history_, train_seconds=spent[0], keep=keep,
                       total_words=total_words)

        t0 = time.perf_counter()
        try:
            corpus = (EpochCorpusWriter(rows, keep, folder, client, seed=self.seed, max_tokens=self.max_tokens)
                      if self.corpus == "file" else
                      ShuffledCorpus(rows, keep, seed=self.seed, max_tokens=self.max_tokens))
            train_epochs(w2v, corpus, epochs=self.epochs, alpha=self.epoch_alpha, total_words=total_words,
                         history=self.history_, progress=self.progress, first_epoch=first_epoch,
                         on_epoch=checkpoint)
        finally:
            if own_dir:
                shutil.rmtree(folder, ignore_errors=True)
        timings["train"] = time.perf_counter() - t0
        train_seconds = spent[0]  # of all runs that trained this model, resumed ones included

        # vectors in store peak order, so the universe BED reads like the training peaks
        order = np.sort(np.array([int(key) for key in w2v.wv.index_to_key], np.int64))
        self.vectors_ = np.ascontiguousarray(w2v.wv[[keys[j] for j in order]], dtype=np.float32)
        uni = peaks.iloc[order].reset_index(drop=True)
        uni["word"] = region_words(uni["chr"], uni["start"], uni["end"])
        self.universe_ = uni
        self.train_summary_ = {
            "n_cells": int(rows.n_cells), "n_regions": int(rows.n_vars), "n_vocabulary": int(len(order)),
            "total_words_per_epoch": total_words, "corpus": self.corpus, "gensim_workers": workers,
            "epochs": self.epochs, "resumed_from_epoch": int(first_epoch),
            "words_per_s": float(total_words * self.epochs / max(train_seconds, 1e-9)),
            "train_words_per_s": float(np.mean([h["words_per_s"] for h in self.history_])),
            "seconds_per_epoch": float(train_seconds / self.epochs),
        }
        self.reference_ = None
        projection = None
        if encode:
            t0 = time.perf_counter()
            projection = self._project(atlas, umap=False)
            timings["encode"] = time.perf_counter() - t0
            if self.labels_key is not None:
                t0 = time.perf_counter()
                lab = obs[self.labels_key].astype(str).to_numpy()
                ref = cells & (np.asarray(obs[self.labels_key].notna()))
                self.set_reference(projection[0][ref], lab[ref])
                timings["reference"] = time.perf_counter() - t0
                if self.umap_model_ is not None:
                    Y = np.full((atlas.n_obs, 2), np.nan, np.float32)
                    Y[ref] = self.reference_umap_
                    projection = projection[:2] + (Y,) + projection[3:]
        timings["total"] = time.perf_counter() - t_all
        self.timings_ = timings
        params = {k: v for k, v in asdict(self).items() if k not in ("progress", "history_")}
        with atlas.publishing("scembed"):  # the embeddings, the UMAP and the record: together or not at all
            if projection is not None:
                self._write_projection(atlas, *projection)
            atlas.record("scembed", params, timings, train=self.train_summary_, history=self.history_)
        if model_out is not None:
            self.save(model_out)
        atlas.clear_resume("scembed")

    def set_reference(self, embeddings: np.ndarray, labels: np.ndarray) -> SCEMBED:
        """Keep labelled reference cells, build the HNSW index over them and (``umap``) a UMAP."""
        embeddings = np.asarray(embeddings, np.float32)
        labels = np.asarray(labels).astype(str)
        if embeddings.shape[0] != labels.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
        self.reference_ = embeddings
        self.label_names_, self.reference_codes_ = np.unique(labels, return_inverse=True)
        self.index_ = hnsw_index(embeddings, self.hnsw_m)
        self.umap_model_, self.reference_umap_ = None, None
        if self.umap and embeddings.shape[0] > 15:
            self.umap_model_, self.reference_umap_ = fit_umap(embeddings, self.umap_max_cells, self.seed)
        return self

    # -- projection --------------------------------------------------------------------------

    def mapping(self, peaks: pd.DataFrame) -> tuple[sp.csr_matrix, dict]:
        """Query peaks -> universe regions: the 0/1 overlap matrix (>= 1 bp) and a report."""
        self._fitted()
        return universe_mapping(peaks, self.universe_)

    def encode(self, store: str | Path | Atlas, *, mod: str | None = None, key_added: str = "X_scembed",
               umap: bool = True, record: bool = True) -> tuple[np.ndarray, dict]:
        """E-projection (and, with a reference UMAP and ``umap=True``, EV-projection) of a store.

        The store's peaks are mapped to the universe by interval overlap, so they may differ
        from the training peaks. Writes ``obsm[key_added]``, ``obs['scembed_n_regions']`` and,
        for EV-projection, ``obsm[key_added + '_umap']``, with the record (``record=True``),
        in one publication. Returns the embeddings and the mapping report.
        """
        t0 = time.perf_counter()
        atlas = store if isinstance(store, Atlas) else open_atlas(store, mod=mod)
        E, n_regions, Y, report = self._project(atlas, umap=umap)
        with atlas.publishing("scembed_encode"):
            self._write_projection(atlas, E, n_regions, Y, report, key_added=key_added)
            if record:
                atlas.record("scembed_encode", {"key_added": key_added, "umap": umap},
                             {"total": time.perf_counter() - t0}, projection=report)
        return E, report

    def _project(self, atlas: Atlas, *, umap: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
        """The embeddings, universe regions per cell, EV-projection (or ``None``) and report of
        ``atlas``'s cells; computed chunk by chunk on the Dask workers, nothing written."""
        self._fitted()
        ovl, report = self.mapping(store_peaks(atlas, "scEmbed projection"))
        if report["n_mapped"] == 0:
            raise InputError(atlas.path, "none of its peaks overlaps the model's universe "
                             f"({report['n_unknown_chromosome']} on chromosomes the model has never seen, "
                             f"e.g. {report['unknown_chromosomes'][:3]})",
                             "check that the store and the model use the same genome assembly and chromosome names")
        if report["n_unknown_chromosome"] or report["n_no_overlap"]:
            logger.info("scembed: %d of %d peaks map to no universe region (%d on unknown chromosomes)",
                        report["n_peaks"] - report["n_mapped"], report["n_peaks"], report["n_unknown_chromosome"])
        E, n_regions = encode_store(atlas, ovl, self.vectors_, dask_client())
        report["n_cells"] = int(atlas.n_obs)
        report["n_cells_without_regions"] = int((n_regions == 0).sum())
        Y = None
        if umap and getattr(self, "umap_model_", None) is not None:
            from ..blocks import transform_in_parallel

            Y = transform_in_parallel(self.umap_model_, E).astype(np.float32)
        self.projection_ = report
        return E, n_regions, Y, report

    @staticmethod
    def _write_projection(atlas: Atlas, E: np.ndarray, n_regions: np.ndarray, Y: np.ndarray | None, report: dict,
                          *, key_added: str = "X_scembed") -> None:
        atlas.write_obsm(key_added, E)
        atlas.write_obs({"scembed_n_regions": n_regions})
        if Y is not None:
            atlas.write_obsm(f"{key_added}_umap", Y)

    # -- annotation --------------------------------------------------------------------------

    def annotate(self, store: str | Path | Atlas, *, mod: str | None = None, k: int = 15,
                 min_confidence: float = 0.5, by_cluster: bool = True, resolution: float | None = None,
                 clusters_per_label: float = 3.0) -> dict:
        """kNN label transfer from the reference, then a cluster-level majority vote.

        Projects the store (:meth:`encode`), finds each cell's ``k`` nearest reference cells
        (cosine, HNSW) and takes their majority label; then clusters the store's cells
        (Leiden on their 15-NN graph) and gives every cell its cluster's majority label.
        The Leiden resolution is ``resolution`` when given, else searched for
        ``clusters_per_label`` clusters per reference label (at most one per 10 cells). A cell
        is *confident* when at least ``min_confidence`` of its neighbours carry its final
        label. Writes the ``obs`` columns listed in the module docstring; returns a summary.
        """
        if not clusters_per_label > 0:
            raise ValueError(f"clusters_per_label must be > 0 (got {clusters_per_label}); "
                             "use by_cluster=False (--no-cluster-vote) to skip the cluster vote")
        if getattr(self, "reference_", None) is None:
            raise ValueError("this model has no reference cells: train with labels_key=... "
                             "(--labels KEY) or call set_reference()")
        t0 = time.perf_counter()
        atlas = store if isinstance(store, Atlas) else open_atlas(store, mod=mod)
        projection = self._project(atlas, umap=True)
        E, n_regions, _, report = projection
        has = n_regions > 0
        k = int(min(k, self.reference_.shape[0]))
        neigh = np.full((atlas.n_obs, k), -1, np.int64)
        if has.any():
            neigh[has] = self.index_.search(unit(E[has]), k)[1]
        nl = np.where(neigh >= 0, self.reference_codes_[np.maximum(neigh, 0)], -1)
        cell_lab, _ = knn_vote(nl, len(self.label_names_))
        clusters = np.full(atlas.n_obs, -1, np.int64)
        n_has = int(has.sum())
        used_resolution, target = resolution, None
        if by_cluster and n_has > 20:
            clusters[has], used_resolution, target = vote_clusters(
                E[has], len(self.label_names_), resolution=resolution, clusters_per_label=clusters_per_label,
                seed=self.seed)
            final = cluster_vote(cell_lab, clusters, len(self.label_names_))
        else:
            final = cell_lab
        conf = np.where(final >= 0, (nl == final[:, None]).sum(1) / k, 0.0)
        names = np.append(self.label_names_, "unassigned")
        confident = conf >= min_confidence
        summary = {"k": k, "min_confidence": min_confidence, "cluster_vote": by_cluster,
                   "resolution": used_resolution, "target_clusters": target,
                   "n_clusters": int(len(np.unique(clusters[has]))) if has.any() else 0,
                   "share_unconfident": float(1 - confident.mean()),
                   "mean_confidence": float(conf.mean()),
                   "label_counts": pd.Series(names[final]).value_counts().to_dict(),
                   "projection": report}
        with atlas.publishing("scembed_annotate"):  # the projection, the labels and the record together
            self._write_projection(atlas, *projection)
            atlas.write_obs({"scembed_label": pd.Categorical(names[final]),
                             "scembed_cell_label": pd.Categorical(names[cell_lab]),
                             "scembed_confidence": conf.astype(np.float32),
                             "scembed_confident": confident,
                             "scembed_cluster": pd.Categorical(clusters.astype(str))})
            atlas.record("scembed_annotate", {"k": k, "min_confidence": min_confidence, "cluster_vote": by_cluster,
                                              "resolution": resolution, "clusters_per_label": clusters_per_label},
                         {"total": time.perf_counter() - t0},
                         summary=summary)
        return summary

    # -- bundle ------------------------------------------------------------------------------

    def save(self, folder: str | Path, *, overwrite: bool = True) -> Path:
        """Write the bundle: ``vectors.npy``, ``universe.bed``, ``config.json`` and, with a
        reference, ``reference/`` (``embeddings.npy``, ``labels.tsv``, ``index.faiss``,
        ``umap.pkl``). Built aside and swapped in whole; returns the folder."""
        self._fitted()
        return write_bundle(self, folder, overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path) -> SCEMBED:
        """Read a bundle written by :meth:`save`."""
        return read_bundle(cls, folder)

    # -- checks ------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.corpus not in CORPUS_MODES:
            raise ValueError(f"corpus={self.corpus!r}; use one of {CORPUS_MODES}")
        for name in ("dim", "window", "epochs", "min_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1] (got {self.lr_decay})")

    def _fitted(self) -> None:
        if getattr(self, "vectors_", None) is None:
            raise ValueError("this SCEMBED is not trained: call fit() or SCEMBED.load(folder)")
