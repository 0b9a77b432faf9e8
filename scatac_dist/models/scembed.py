"""scEmbed (LeRoy et al.): word2vec over genomic regions, cell embeddings, projection and
label transfer.

Each cell is a document whose words are its accessible regions (``chr_start_end``), in random
order. gensim's word2vec learns one vector per region; a cell's embedding is the mean of the
vectors of its regions that are in the vocabulary.

Reads ``X`` (any nonzero is signal), ``var['chr'|'start'|'end']`` and, when present,
``obs['pass_qc']`` (training cells). Writes:

* ``obsm['X_scembed']``: cell embeddings (zeros for a cell without vocabulary regions);
  ``obs['scembed_n_regions']``: universe regions each cell touches;
* with a reference UMAP and ``umap=True`` (EV-projection): ``obsm['X_scembed_umap']``;
* ``annotate``: ``obs['scembed_label']`` (after the cluster vote), ``obs['scembed_confidence']``
  (share of the cell's k reference neighbours that carry that label), ``obs['scembed_cell_label']``
  (the cell's own kNN vote), ``obs['scembed_cluster']`` and ``obs['scembed_confident']``;
* ``uns/scatac_dist/scembed*``: parameters, timings, training and projection summaries.

Training (paper, Methods): window 5, 100 dimensions, 100 epochs, learning rate decayed by
0.95 per epoch. gensim is called one epoch at a time with ``start_alpha = alpha * 0.95^e``
and ``end_alpha = alpha * 0.95^(e+1)``, floored at ``min_alpha``; ``alpha = 0.1`` and
``min_alpha = 1e-4`` are the authors' package defaults (the paper names no starting rate).
Other word2vec settings are gensim's (CBOW, 5 negative samples, downsampling 1e-3).
The vocabulary is every region seen in at least ``min_count`` training cells, counted from
the store in one pass, so no corpus scan is needed before training.

Measured choices (``benchmarks/bench_scembed.py``, k-means ARI): gensim's default rate 0.025
learns far too slowly under the 0.95 decay (bm0828 after 30 epochs: 0.11 against 0.40 at
0.1; 0.25 gave 0.42). CBOW, gensim's default and the authors' package's, stays the default:
at 100 epochs it gives bm0828 0.416 +- 0.003 (3 seeds) and Leukemia 0.750 +- 0.013, where
skip-gram (``sg=1``) gives 0.479 and 0.586 (seed 0) at 3.4x the training time. The authors'
``min_count`` of 10 changed nothing on bm0828 (every peak is in >= 10 cells) and gave 0.756
on Leukemia; gensim's 5 stays.

Annotation follows the paper: each cell's kNN vote, then its cluster's majority. The
cluster vote helps when clusters are pure and costs F1 when a cluster mixes types (rare
types are outvoted); ``obs['scembed_cell_label']`` keeps the cell's own vote either way.
The paper does not say how finely the new data is clustered. A cluster can pass on only one
label, so clusters coarser than the reference's labels erase the rarer ones: on the SNARE
transfer halves (14 labels, 4,595 query cells, 100 epochs) Leiden at resolution 1 gave 7
clusters and a macro F1 of 0.232, with only 5 labels surviving, against 0.334 for the
cells' own votes. By default the resolution is therefore searched for
``clusters_per_label`` (3) clusters per reference label, at most one per 10 query cells.
Measured F1 on those halves as the clusters grow: 15 clusters 0.242, 37 0.299, 107 0.292,
255 0.293, 489 0.295; flat past about 2.5 clusters per label, so the factor is not a sharp
optimum. ``resolution=`` fixes the resolution instead.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from ..ops.corpus import MAX_TOKENS, token_keys
from ..ops.label_transfer import cluster_vote, knn_vote
from ..ops.regions import overlap_matrix, overlap_pairs, region_words
from ..store import Atlas, open_atlas
from ..train.data import StoreRows
from ._scembed_corpus import EpochCorpusWriter, ShuffledCorpus

logger = logging.getLogger("scatac_dist")

BUNDLE_VERSION = 1
CORPUS_MODES = ("file", "iterable")


def _peaks(atlas: Atlas) -> pd.DataFrame:
    var = atlas.var
    missing = [c for c in ("chr", "start", "end") if c not in var]
    if missing:
        raise InputError(atlas.path, f"var has no peak coordinates (missing {missing})",
                         "ingest the matrix with its peaks BED / features file so var has chr, start, end")
    return pd.DataFrame({"chr": var["chr"].astype(str).to_numpy(), "start": var["start"].to_numpy(np.int64),
                         "end": var["end"].to_numpy(np.int64)})


def _client():
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        raise RuntimeError("scEmbed runs on a Dask cluster: start one first (scatac_dist.get_client())") from None


def _chunk_doc_freq(rows: StoreRows, k: int) -> np.ndarray:
    m, _ = rows.read_chunk(k)
    return np.bincount(m.indices, minlength=rows.n_vars).astype(np.int64)


def _encode_chunk(rows: StoreRows, k: int, ovl: sp.csr_matrix, V: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean universe vector of each cell of chunk ``k``: ``H = 1[B O > 0]`` (O: overlap matrix), ``E = H V / H 1``."""
    m, cells = rows.read_chunk(k)
    H = sp.csr_matrix(m @ ovl)
    H.data[:] = 1.0
    n = np.asarray(H.sum(1)).ravel()
    E = np.asarray(H @ V, np.float32)
    E /= np.maximum(n, 1)[:, None]
    return cells, E, n.astype(np.int64)


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
        Learning rate ``alpha * lr_decay^epoch``, not below ``min_alpha``.
    workers
        gensim training threads (default: the cores of this machine).
    sg, negative
        word2vec flavour: CBOW (``sg=0``, gensim's default) or skip-gram (``sg=1``), and the
        number of negative samples.
    corpus
        ``"file"``: shards written by Dask workers, next epoch written while this one trains;
        ``"iterable"``: a reshuffling iterable read in this process (small data).
    corpus_dir
        Folder for the corpus files (default: a temporary folder); must be visible to the workers.
    labels_key
        ``obs`` column of the training store to keep as reference labels for ``annotate``.
    umap
        Fit a UMAP on the reference embeddings (for EV-projection), on at most
        ``umap_max_cells`` sampled cells.
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

    def _check(self) -> None:
        if self.corpus not in CORPUS_MODES:
            raise ValueError(f"corpus={self.corpus!r}; use one of {CORPUS_MODES}")
        for name in ("dim", "window", "epochs", "min_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1] (got {self.lr_decay})")

    def epoch_alpha(self, epoch: int) -> float:
        return max(self.alpha * self.lr_decay ** epoch, self.min_alpha)

    def fit(self, store: str | Path | Atlas, *, mod: str | None = None, encode: bool = True) -> SCEMBED:
        """Train on ``store``'s cells (those with ``obs['pass_qc']`` if present), then encode
        the store into ``obsm['X_scembed']`` (``encode=True``)."""
        from gensim.models import Word2Vec

        self._check()
        t_all = time.perf_counter()
        atlas = store if isinstance(store, Atlas) else open_atlas(store, mod=mod)
        peaks = _peaks(atlas)
        client = _client()
        obs = atlas.obs
        cells = obs["pass_qc"].to_numpy(bool) if "pass_qc" in obs else np.ones(atlas.n_obs, bool)
        if self.labels_key is not None and self.labels_key not in obs:
            raise InputError(atlas.path, f"obs has no column {self.labels_key!r}",
                             f"use one of {list(obs.columns)} or omit labels_key")
        if not cells.any():
            raise InputError(atlas.path, "no cells pass QC", "re-run QC with looser thresholds")
        rows = StoreRows(atlas.path, mod=atlas.mod, cells=cells, chunk_rows=atlas.chunk_rows)
        timings = {}

        t0 = time.perf_counter()
        rows_f = client.scatter(rows, broadcast=True, hash=False)
        parts = [client.submit(_chunk_doc_freq, rows_f, k, pure=False)
                 for k in range(rows.n_chunks) if rows.chunk_cells[k]]
        df = np.zeros(rows.n_vars, np.int64)
        for f in parts:  # summed in chunk order on the client: n_vars integers each
            df += f.result()
        del parts
        keep = df >= self.min_count
        if not keep.any():
            raise InputError(atlas.path, f"no region is accessible in >= {self.min_count} cells",
                             "lower min_count (--min-count)")
        keys = token_keys(rows.n_vars)
        total_words = int(df[keep].sum())
        timings["vocabulary"] = time.perf_counter() - t0

        workers = int(self.workers or os.cpu_count() or 1)
        w2v = Word2Vec(vector_size=self.dim, window=self.window, min_count=1, workers=workers, seed=self.seed,
                       sg=self.sg, negative=self.negative, alpha=self.alpha, min_alpha=self.min_alpha)
        w2v.build_vocab_from_freq({keys[j]: int(df[j]) for j in np.flatnonzero(keep)},
                                  corpus_count=int(rows.n_cells))

        own_dir = self.corpus_dir is None
        folder = Path(tempfile.mkdtemp(prefix="scembed-corpus-")) if own_dir else Path(self.corpus_dir)
        bar = _bar(self.epochs, self.progress, "scEmbed epochs")
        self.history_ = []
        t0 = time.perf_counter()
        try:
            if self.corpus == "file":
                writer = EpochCorpusWriter(rows, keep, folder, client, seed=self.seed, max_tokens=self.max_tokens)
                nxt = writer.submit(0)
                for e in range(self.epochs):
                    tw = time.perf_counter()
                    path, n_docs, n_tok = nxt.result()
                    wait = time.perf_counter() - tw
                    nxt = writer.submit(e + 1) if e + 1 < self.epochs else None
                    tt = time.perf_counter()
                    _, raw = w2v.train(corpus_file=path, total_words=n_tok, epochs=1,
                                       start_alpha=self.epoch_alpha(e), end_alpha=self.epoch_alpha(e + 1))
                    dt = time.perf_counter() - tt
                    os.remove(path)
                    self._log_epoch(e, n_docs, raw, dt, wait, bar)
            else:
                corpus = ShuffledCorpus(rows, keep, seed=self.seed, max_tokens=self.max_tokens)
                for e in range(self.epochs):
                    tt = time.perf_counter()
                    _, raw = w2v.train(corpus_iterable=corpus, total_words=total_words, epochs=1,
                                       start_alpha=self.epoch_alpha(e), end_alpha=self.epoch_alpha(e + 1))
                    self._log_epoch(e, None, raw, time.perf_counter() - tt, 0.0, bar)
        finally:
            bar.close()
            if own_dir:
                shutil.rmtree(folder, ignore_errors=True)
        timings["train"] = time.perf_counter() - t0

        # vectors in store peak order, so the universe BED reads like the training peaks
        order = np.sort(np.array([int(key) for key in w2v.wv.index_to_key], np.int64))
        self.vectors_ = np.ascontiguousarray(w2v.wv[[keys[j] for j in order]], dtype=np.float32)
        uni = peaks.iloc[order].reset_index(drop=True)
        uni["word"] = region_words(uni["chr"], uni["start"], uni["end"])
        self.universe_ = uni
        self.train_summary_ = {
            "n_cells": int(rows.n_cells), "n_regions": int(rows.n_vars), "n_vocabulary": int(len(order)),
            "total_words_per_epoch": total_words, "corpus": self.corpus, "gensim_workers": workers,
            "epochs": self.epochs,
            "words_per_s": float(total_words * self.epochs / max(timings["train"], 1e-9)),
            "train_words_per_s": float(np.mean([h["words_per_s"] for h in self.history_])),
            "seconds_per_epoch": float(timings["train"] / self.epochs),
        }
        self.reference_ = None
        if encode:
            t0 = time.perf_counter()
            E, _ = self.encode(atlas, umap=False, record=False)
            timings["encode"] = time.perf_counter() - t0
            if self.labels_key is not None:
                t0 = time.perf_counter()
                lab = obs[self.labels_key].astype(str).to_numpy()
                ref = cells & (np.asarray(obs[self.labels_key].notna()))
                self.set_reference(E[ref], lab[ref])
                timings["reference"] = time.perf_counter() - t0
                if self.umap_model_ is not None:
                    Y = np.full((atlas.n_obs, 2), np.nan, np.float32)
                    Y[ref] = self.reference_umap_
                    atlas.write_obsm("X_scembed_umap", Y)
        timings["total"] = time.perf_counter() - t_all
        self.timings_ = timings
        params = {k: v for k, v in asdict(self).items() if k not in ("progress", "history_")}
        atlas.record("scembed", params, timings, train=self.train_summary_, history=self.history_)
        return self

    def _log_epoch(self, e, n_docs, raw, dt, wait, bar) -> None:
        rec = {"epoch": e, "alpha": self.epoch_alpha(e), "words": int(raw), "seconds": dt,
               "words_per_s": float(raw / max(dt, 1e-9)), "waited_for_corpus_s": wait}
        if n_docs is not None:
            rec["documents"] = int(n_docs)
        self.history_.append(rec)
        logger.debug("scembed epoch %d: %.0f words/s", e, rec["words_per_s"])
        bar.update(1)
        bar.set_postfix(words_per_s=f"{rec['words_per_s']:.3g}")

    # -- reference (for annotation) ------------------------------------------------------------

    def set_reference(self, embeddings: np.ndarray, labels: np.ndarray) -> SCEMBED:
        """Keep labelled reference cells, build the HNSW index over them and (``umap``) a UMAP."""
        embeddings = np.asarray(embeddings, np.float32)
        labels = np.asarray(labels).astype(str)
        if embeddings.shape[0] != labels.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
        self.reference_ = embeddings
        self.label_names_, self.reference_codes_ = np.unique(labels, return_inverse=True)
        self.index_ = _hnsw(embeddings, self.hnsw_m)
        self.umap_model_, self.reference_umap_ = None, None
        if self.umap and embeddings.shape[0] > 15:
            from umap import UMAP

            n = embeddings.shape[0]
            model = UMAP(n_components=2, random_state=42)  # the paper's visualisation seed
            if n <= self.umap_max_cells:
                self.reference_umap_ = model.fit_transform(embeddings).astype(np.float32)
            else:
                sample = np.sort(np.random.default_rng(self.seed).choice(n, self.umap_max_cells, replace=False))
                model.fit(embeddings[sample])
                self.reference_umap_ = model.transform(embeddings).astype(np.float32)
                self.reference_umap_[sample] = model.embedding_
            self.umap_model_ = model
        return self

    # -- projection --------------------------------------------------------------------------

    def mapping(self, peaks: pd.DataFrame) -> tuple[sp.csr_matrix, dict]:
        """Query peaks -> universe regions: the 0/1 overlap matrix (>= 1 bp) and a report."""
        self._fitted()
        uni = self.universe_
        qi, ri = overlap_pairs(peaks["chr"], peaks["start"], peaks["end"], uni["chr"], uni["start"], uni["end"])
        ovl = overlap_matrix(qi, ri, len(peaks), len(uni))
        known = pd.Index(uni["chr"].unique())
        unknown_chr = ~pd.Index(peaks["chr"].astype(str)).isin(known)
        hit = np.zeros(len(peaks), bool)
        hit[qi] = True
        report = {"n_peaks": int(len(peaks)), "n_mapped": int(hit.sum()),
                  "n_unknown_chromosome": int(unknown_chr.sum()),
                  "n_no_overlap": int((~hit & ~unknown_chr).sum()),
                  "unknown_chromosomes": sorted(set(peaks["chr"].astype(str)[unknown_chr]))[:20],
                  "n_pairs": int(len(qi)), "n_universe_hit": int(len(np.unique(ri)))}
        return ovl, report

    def encode(self, store: str | Path | Atlas, *, mod: str | None = None, key_added: str = "X_scembed",
               umap: bool = True, record: bool = True) -> tuple[np.ndarray, dict]:
        """E-projection (and, with a reference UMAP and ``umap=True``, EV-projection) of a store.

        The store's peaks are mapped to the universe by interval overlap, so they may differ
        from the training peaks. Writes ``obsm[key_added]``, ``obs['scembed_n_regions']`` and,
        for EV-projection, ``obsm[key_added + '_umap']``. Returns the embeddings and the mapping report.
        """
        self._fitted()
        t0 = time.perf_counter()
        atlas = store if isinstance(store, Atlas) else open_atlas(store, mod=mod)
        ovl, report = self.mapping(_peaks(atlas))
        if report["n_mapped"] == 0:
            raise InputError(atlas.path, "none of its peaks overlaps the model's universe "
                             f"({report['n_unknown_chromosome']} on chromosomes the model has never seen, "
                             f"e.g. {report['unknown_chromosomes'][:3]})",
                             "check that the store and the model use the same genome assembly and chromosome names")
        if report["n_unknown_chromosome"] or report["n_no_overlap"]:
            logger.info("scembed: %d of %d peaks map to no universe region (%d on unknown chromosomes)",
                        report["n_peaks"] - report["n_mapped"], report["n_peaks"], report["n_unknown_chromosome"])
        client = _client()
        rows = StoreRows(atlas.path, mod=atlas.mod, chunk_rows=atlas.chunk_rows)
        rows_f, ovl_f, V_f = (client.scatter(x, broadcast=True, hash=False) for x in (rows, ovl, self.vectors_))
        futs = [client.submit(_encode_chunk, rows_f, k, ovl_f, V_f, pure=False) for k in range(rows.n_chunks)]
        E = np.zeros((atlas.n_obs, self.dim), np.float32)
        n_regions = np.zeros(atlas.n_obs, np.int64)
        for f in futs:
            cells, Eb, nb = f.result()
            E[cells], n_regions[cells] = Eb, nb
            f.release()
        report["n_cells"] = int(atlas.n_obs)
        report["n_cells_without_regions"] = int((n_regions == 0).sum())
        atlas.write_obsm(key_added, E)
        atlas.write_obs({"scembed_n_regions": n_regions})
        if umap and getattr(self, "umap_model_", None) is not None:
            from ..blocks import transform_in_parallel

            atlas.write_obsm(f"{key_added}_umap", transform_in_parallel(self.umap_model_, E).astype(np.float32))
        if record:
            atlas.record("scembed_encode", {"key_added": key_added, "umap": umap},
                         {"total": time.perf_counter() - t0}, projection=report)
        self.projection_ = report
        return E, report

    # -- annotation --------------------------------------------------------------------------

    def annotate(self, store: str | Path | Atlas, *, mod: str | None = None, k: int = 15,
                 min_confidence: float = 0.5, by_cluster: bool = True, resolution: float | None = None,
                 clusters_per_label: float = 3.0) -> dict:
        """kNN label transfer from the reference, then a cluster-level majority vote.

        Projects the store (:meth:`encode`), finds each cell's ``k`` nearest reference cells
        (cosine, HNSW) and takes their majority label; then clusters the store's cells
        (Leiden on their 15-NN graph) and gives every cell its cluster's majority label.
        The Leiden resolution is ``resolution`` when given, else searched for
        ``clusters_per_label`` clusters per reference label (at most one per 10 cells; see
        the module docstring for why). A cell is *confident* when at least
        ``min_confidence`` of its neighbours carry its final label. Writes the ``obs``
        columns listed in the module docstring.
        """
        from ..tl.graph import connectivities, knn_graph, leiden_labels, search_resolution

        if not clusters_per_label > 0:
            raise ValueError(f"clusters_per_label must be > 0 (got {clusters_per_label}); "
                             "use by_cluster=False (--no-cluster-vote) to skip the cluster vote")
        if getattr(self, "reference_", None) is None:
            raise ValueError("this model has no reference cells: train with labels_key=... "
                             "(--labels KEY) or call set_reference()")
        t0 = time.perf_counter()
        atlas = store if isinstance(store, Atlas) else open_atlas(store, mod=mod)
        E, report = self.encode(atlas, record=False)
        has = np.asarray(atlas.obs["scembed_n_regions"].to_numpy() > 0)
        k = int(min(k, self.reference_.shape[0]))
        neigh = np.full((atlas.n_obs, k), -1, np.int64)
        if has.any():
            neigh[has] = self.index_.search(_unit(E[has]), k)[1]
        nl = np.where(neigh >= 0, self.reference_codes_[np.maximum(neigh, 0)], -1)
        cell_lab, _ = knn_vote(nl, len(self.label_names_))
        clusters = np.full(atlas.n_obs, -1, np.int64)
        n_has = int(has.sum())
        used_resolution, target = resolution, None
        if by_cluster and n_has > 20:
            idx, dist = knn_graph(_unit(E[has]), min(15, n_has - 1), seed=self.seed)
            graph = connectivities(idx, dist, n_has)
            if resolution is None:
                target = int(max(1, min(round(clusters_per_label * len(self.label_names_)), n_has // 10)))
                used_resolution, clusters[has] = search_resolution(graph, target, seed=self.seed)
            else:
                clusters[has] = leiden_labels(graph, resolution, seed=self.seed)
            final = cluster_vote(cell_lab, clusters, len(self.label_names_))
        else:
            final = cell_lab
        conf = np.where(final >= 0, (nl == final[:, None]).sum(1) / k, 0.0)
        names = np.append(self.label_names_, "unassigned")
        confident = conf >= min_confidence
        atlas.write_obs({"scembed_label": pd.Categorical(names[final]),
                         "scembed_cell_label": pd.Categorical(names[cell_lab]),
                         "scembed_confidence": conf.astype(np.float32),
                         "scembed_confident": confident,
                         "scembed_cluster": pd.Categorical(clusters.astype(str))})
        summary = {"k": k, "min_confidence": min_confidence, "cluster_vote": by_cluster,
                   "resolution": used_resolution, "target_clusters": target,
                   "n_clusters": int(len(np.unique(clusters[has]))) if has.any() else 0,
                   "share_unconfident": float(1 - confident.mean()),
                   "mean_confidence": float(conf.mean()),
                   "label_counts": pd.Series(names[final]).value_counts().to_dict(),
                   "projection": report}
        atlas.record("scembed_annotate", {"k": k, "min_confidence": min_confidence, "cluster_vote": by_cluster,
                                          "resolution": resolution, "clusters_per_label": clusters_per_label},
                     {"total": time.perf_counter() - t0},
                     summary=summary)
        return summary

    # -- bundle ------------------------------------------------------------------------------

    def _fitted(self) -> None:
        if getattr(self, "vectors_", None) is None:
            raise ValueError("this SCEMBED is not trained: call fit() or SCEMBED.load(folder)")

    def save(self, folder: str | Path, *, overwrite: bool = True) -> Path:
        """Write the bundle: ``vectors.npy``, ``universe.bed``, ``config.json`` and, with a
        reference, ``reference/`` (``embeddings.npy``, ``labels.tsv``, ``index.faiss``,
        ``umap.pkl``). Built aside and swapped in whole."""
        import faiss

        from ..store import replace_dir

        self._fitted()
        folder = Path(folder).absolute()
        if folder.exists() and not overwrite:
            raise FileExistsError(f"{folder} exists; pass overwrite=True")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.mkdir()
            np.save(tmp / "vectors.npy", self.vectors_)
            self.universe_[["chr", "start", "end", "word"]].to_csv(tmp / "universe.bed", sep="\t", header=False,
                                                                    index=False)
            params = {k: v for k, v in asdict(self).items() if k not in ("progress", "history_")}
            cfg = {"version": BUNDLE_VERSION, "params": params, "train": getattr(self, "train_summary_", None),
                   "has_reference": self.reference_ is not None}
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
            if getattr(self, "reference_", None) is not None:
                ref = tmp / "reference"
                ref.mkdir()
                np.save(ref / "embeddings.npy", self.reference_)
                pd.DataFrame({"label": self.label_names_[self.reference_codes_]}).to_csv(ref / "labels.tsv",
                                                                                        sep="\t", index=False)
                faiss.write_index(self.index_, str(ref / "index.faiss"))
                if self.umap_model_ is not None:
                    with open(ref / "umap.pkl", "wb") as fh:
                        pickle.dump(self.umap_model_, fh)
                    np.save(ref / "umap_embedding.npy", self.reference_umap_)
            replace_dir(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SCEMBED:
        """Read a bundle written by :meth:`save`."""
        import faiss

        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.exists():
            raise InputError(folder, "is not a scEmbed model folder (no config.json)",
                             "pass the folder written by `scatac-dist scembed train --model-out`")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("version") != BUNDLE_VERSION:
            raise InputError(folder, f"bundle version {cfg.get('version')} (this code reads {BUNDLE_VERSION})",
                             "re-train the model with this version of scatac-dist")
        self = cls(**cfg["params"])
        self.train_summary_ = cfg.get("train")
        self.vectors_ = np.load(folder / "vectors.npy")
        uni = pd.read_csv(folder / "universe.bed", sep="\t", header=None, names=["chr", "start", "end", "word"],
                          dtype={"chr": str, "start": np.int64, "end": np.int64, "word": str})
        if len(uni) != self.vectors_.shape[0]:
            raise InputError(folder, f"universe.bed has {len(uni)} regions but vectors.npy {self.vectors_.shape[0]}",
                             "the bundle is damaged; save it again")
        self.universe_ = uni
        self.reference_, self.umap_model_, self.reference_umap_ = None, None, None
        ref = folder / "reference"
        if cfg.get("has_reference") and ref.exists():
            self.reference_ = np.load(ref / "embeddings.npy")
            labels = pd.read_csv(ref / "labels.tsv", sep="\t", dtype=str, keep_default_na=False)["label"].to_numpy()
            self.label_names_, self.reference_codes_ = np.unique(labels, return_inverse=True)
            self.index_ = faiss.read_index(str(ref / "index.faiss"))
            if (ref / "umap.pkl").exists():
                with open(ref / "umap.pkl", "rb") as fh:
                    self.umap_model_ = pickle.load(fh)
                self.reference_umap_ = np.load(ref / "umap_embedding.npy")
        return self


def _unit(E: np.ndarray) -> np.ndarray:
    E = np.asarray(E, np.float32)
    return E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)


def _hnsw(E: np.ndarray, m: int):
    """A faiss HNSW index over unit vectors with inner-product search: cosine similarity."""
    import faiss

    index = faiss.IndexHNSWFlat(E.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    index.hnsw.efSearch = 128
    index.add(_unit(E))
    return index


def _bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
