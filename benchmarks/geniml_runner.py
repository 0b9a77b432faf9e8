"""geniml scEmbed peer runner: the scEmbed authors' geniml package on a cells x peaks matrix.

Trains ``geniml.scembed.main.ScEmbed`` (PyPI ``geniml`` 0.8.4, databio; scEmbed, LeRoy et al.
2024, NAR Genomics and Bioinformatics, doi:10.1093/nargab/lqae073) on the input cells, with
the peaks of the input as the universe (every peak is a token), and writes one embedding per
cell. It must be run with the interpreter of the separate geniml virtualenv (``make
bench-geniml-install`` creates ``benchmarks/work/geniml-venv``); it does not import
``scatac_dist``.

The calls are the ones geniml's scEmbed tutorial (``docs/tutorials/train-scembed-model.md``)
documents: a ``gtars.tokenizers.Tokenizer`` built from the universe BED file, the cells
pre-tokenized into a parquet file with a ``tokens`` column (one row per cell), read by
``geniml.region2vec.utils.Region2VecDataset``; ``ScEmbed(tokenizer=tokenizer)``;
``model.train(dataset, ...)``; ``model.encode(adata)``. The tutorial passes ``epochs=100``;
this runner passes only ``seed`` (and ``epochs`` with ``--epochs``), so every other option
keeps the default of the installed signatures, read with ``inspect.signature`` and written to
the JSON (``defaults``). In 0.8.4:

``ScEmbed.__init__``
    ``pooling_method="mean"``, ``device=None`` (CUDA if available, else CPU); the embedding
    size is ``DEFAULT_EMBEDDING_DIM = 100`` (``embedding_dim`` keyword, not set).
``ScEmbed.train``
    ``epochs=10`` (``region2vec.const.DEFAULT_EPOCHS``), ``window_size=5``, ``min_count=10``,
    ``num_cpus=1`` (gensim ``workers``), ``seed=42`` (the runner passes ``--seed``, default
    0), ``gensim_params={}``.
``Region2VecDataset.__init__``
    ``shuffle=True`` (each cell's tokens are shuffled with Python's ``random`` every time
    the cell is read, i.e. once per epoch), ``convert_to_str=False`` (integer token ids).
``gensim.models.Word2Vec`` (options geniml does not set; gensim's defaults)
    CBOW (``sg=0``), negative sampling ``negative=5`` with ``ns_exponent=0.75``, ``hs=0``,
    ``alpha=0.025`` decaying linearly to ``min_alpha=0.0001`` over the ``train`` call,
    ``sample=0.001`` (frequent-token down-sampling), ``cbow_mean=1``,
    ``shrink_windows=True``.

What it does, for the record (read from the installed package): ``ScEmbed.train`` builds a
gensim Word2Vec (``vector_size`` 100, ``window`` 5, ``min_count`` 10, ``workers`` 1,
``seed``), builds the vocabulary from the dataset (tokens occurring fewer than ``min_count``
times over all cells, i.e. peaks non-zero in fewer than ``min_count`` cells, are left out),
trains for ``epochs`` passes over the cells (each cell is one "sentence" of its shuffled
tokens) and copies each vocabulary token's gensim vector into row ``token id`` of a
``torch.nn.Embedding(len(tokenizer), 100)``. Rows of tokens left out of the vocabulary (rare
peaks, and the tokenizer's 7 special tokens) keep torch's random N(0, 1) initialisation (the
runner seeds torch with ``--seed``). A cell's embedding is the mean (``pooling_method``) of
the embedding rows of its tokens, untrained rows included. The tokenizer maps a region to
every universe region it overlaps (half-open BED intervals: adjacent bins do not overlap),
and an empty region list to ``[<unk>]``; a cell with no non-zero peak therefore gets the
``<unk>`` row (random; counted as ``n_cells_no_token``). With ``num_cpus=1`` and the seeds
set, two runs give the same embedding. Training time grows with the number of non-zero
entries times ``epochs``: 1,000 cells x 20,000 peaks at 5 % non-zero (10^6 tokens) trained
in 18 s with the default 10 epochs and in 168 s with 100 (one core, shared).

Two calls of geniml 0.8.4 do not run with gtars 0.10.0, and the runner does their work
itself, with the same tokenizer and the same arithmetic. ``gtars.models.Region`` needs a
fourth argument ``rest`` in every gtars release from 0.5.3 on (tried: 0.5.3 to 0.10.0); with
gtars 0.4.0, where three arguments suffice, ``ScEmbed.encode`` still fails, because it
iterates over each cell's ``BatchEncoding`` (``t["input_ids"] for t in sublist``), which
gtars does not support. The two calls:
``geniml.tokenization.utils.tokenize_anndata`` (for each cell, the var rows whose X entry is
non-zero, as ``Region(chr, start, end)``, passed to the tokenizer) is done with
``Region(chr, start, end, "")``; ``ScEmbed.encode(adata)`` (that tokenization, then
``mean(model.projection(token_ids), axis=0)`` per cell) is tried first and, when it raises,
done by the runner with the trained ``model.model.projection``; ``api.encode`` says which ran
and ``encode_fallback_reason`` why.

Outputs in OUTDIR
-----------------
``embedding.npy``
    cells x 100, float32, rows in input order.
``result.json``
    ``status`` (``"ok"`` or ``"error: ..."``, with ``traceback``), ``versions`` (geniml,
    gtars, gensim, torch, ...), ``api`` (the calls made), ``params`` (every argument
    passed), ``defaults`` (the options left unset, from the signatures), ``times_s``
    (``import``: geniml, gtars, torch, gensim and anndata; ``load``: read the h5ad;
    ``tokenize``: universe BED, tokenizer, tokenization, parquet; ``train``: ``ScEmbed``
    construction and ``ScEmbed.train``; ``encode``; ``save``; ``total``: process start to the
    JSON write), ``n_cells``, ``n_peaks``, ``dim``, ``vocab_size`` (peaks + 7 special
    tokens), token counts (``tokens``: per cell, in the vocabulary, peaks below
    ``min_count``), ``n_cells_no_token`` (no non-zero peak: embedding = the ``<unk>`` row),
    ``n_cells_untrained_only`` (every token outside the gensim vocabulary),
    ``peak_rss_bytes`` (``ru_maxrss``, self).
``_work/``
    ``universe.bed`` (the input peaks, in input order) and ``tokens.parquet``; removed at
    the end, also after an error, unless ``--keep-work``.

Usage::

    benchmarks/work/geniml-venv/bin/python benchmarks/geniml_runner.py IN.h5ad OUTDIR
        [--seed 0] [--epochs N] [--keep-work]

IN.h5ad: cells x peaks, X sparse (counts or 0/1; only non-zero matters), var_names
``chrom_start_end`` (``chrom:start-end`` also read). obs is ignored. ``--epochs`` overrides
geniml's default (10) and exists for quick checks only.

Exit status: 0 when it succeeded, 1 when it failed (``result.json`` still written).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

T_PROCESS = time.perf_counter()

# benchmarks/harness: only its standard-library modules (this runs under the geniml virtualenv)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.environment import signature_defaults, versions  # noqa: E402
from harness.results import jsonable, write_json  # noqa: E402

RESULT_NAME = "result.json"
EMBEDDING_NAME = "embedding.npy"
_PEAK_RE = re.compile(r"^(.+)[_:](\d+)[_-](\d+)$")
_VERSIONS = ("geniml", "gtars", "gensim", "torch", "numpy", "scipy", "pandas", "anndata", "scanpy",
             "pyarrow", "h5py")


def parse_peaks(names: Any) -> tuple[list[str], list[int], list[int]]:
    """``chrom_start_end`` (or ``chrom:start-end``) names -> chrom, start, end lists."""
    chroms, starts, ends = [], [], []
    for name in names:
        m = _PEAK_RE.match(str(name))
        if m is None:
            raise ValueError(f"peak name {name!r} is not chrom_start_end")
        chroms.append(m.group(1))
        starts.append(int(m.group(2)))
        ends.append(int(m.group(3)))
    return chroms, starts, ends


def _unset(func: Any, passed: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in signature_defaults(func).items() if k not in passed}


def run(args: argparse.Namespace, res: dict[str, Any], times: dict[str, float]) -> None:
    out = Path(args.outdir)
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    import anndata
    import geniml
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.sparse as sp
    import torch
    from geniml.region2vec import const as r2v_const
    from geniml.region2vec.utils import Region2VecDataset
    from geniml.scembed.main import ScEmbed
    from gensim.models import Word2Vec
    from gtars.models import Region
    from gtars.tokenizers import Tokenizer
    times["import"] = time.perf_counter() - t
    res["versions"] = versions(_VERSIONS)
    res["geniml_version"] = getattr(geniml, "__version__", res["versions"].get("geniml"))

    # ---- load
    t = time.perf_counter()
    adata = anndata.read_h5ad(args.input)
    X = adata.X
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    X = X.astype(np.float32, copy=True)
    X.eliminate_zeros()
    n_cells, n_peaks = X.shape
    res.update(n_cells=int(n_cells), n_peaks=int(n_peaks), n_nonzero=int(X.nnz))
    chroms, starts, ends = parse_peaks(adata.var_names)
    # geniml's AnnData contract: var has chr, start, end; only X and var are passed on
    adata = anndata.AnnData(X=X, var={"chr": chroms, "start": starts, "end": ends})
    adata.var_names = [f"{c}_{s}_{e}" for c, s, e in zip(chroms, starts, ends)]
    times["load"] = time.perf_counter() - t

    # ---- tokenize (universe = the input peaks, in input order)
    t = time.perf_counter()
    universe = work / "universe.bed"
    with open(universe, "w") as fh:
        for c, s, e in zip(chroms, starts, ends):
            fh.write(f"{c}\t{s}\t{e}\n")
    tokenizer = Tokenizer(str(universe))
    features = np.empty(n_peaks, dtype=object)
    for i, (c, s, e) in enumerate(zip(chroms, starts, ends)):
        features[i] = Region(c, s, e, "")
    tokens: list[list[int]] = []
    indptr, indices = X.indptr, X.indices
    for row in range(n_cells):
        cols = indices[indptr[row]:indptr[row + 1]]
        tokens.append(list(tokenizer(features[cols])["input_ids"]))
    parquet = work / "tokens.parquet"
    pq.write_table(pa.table({"tokens": pa.array(tokens, type=pa.list_(pa.int64()))}), parquet)
    times["tokenize"] = time.perf_counter() - t
    vocab_size = len(tokenizer)
    unk = tokenizer.unk_token_id
    res["vocab_size"] = int(vocab_size)
    res["special_tokens"] = {k: tokenizer.convert_tokens_to_ids(v)
                             for k, v in tokenizer.special_tokens_map.items() if v is not None}

    # ---- train
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    dataset = Region2VecDataset(str(parquet))
    init_passed = {"tokenizer": f"gtars.tokenizers.Tokenizer({universe.name}: the {n_peaks} input peaks)"}
    model = ScEmbed(tokenizer=tokenizer)
    train_passed: dict[str, Any] = {"seed": args.seed}
    if args.epochs is not None:
        train_passed["epochs"] = args.epochs
    model.train(dataset, **train_passed)
    times["train"] = time.perf_counter() - t
    dim = int(model.model.embedding_dim)
    res["dim"] = dim

    train_defaults = signature_defaults(ScEmbed.train)
    epochs = train_passed.get("epochs", train_defaults["epochs"])
    min_count = train_defaults["min_count"]
    geniml_sets = {"vector_size", "window", "min_count", "workers", "seed"}
    res["params"] = {
        "ScEmbed.__init__": init_passed,
        "ScEmbed.train": {"dataset": f"Region2VecDataset({parquet.name})", **train_passed},
        "Region2VecDataset.__init__": {"path": parquet.name},
        "effective": {"epochs": epochs, "embedding_dim": dim, "window_size": train_defaults["window_size"],
                      "min_count": min_count, "num_cpus": train_defaults["num_cpus"],
                      "pooling_method": model.pooling_method},
    }
    res["defaults"] = {
        "ScEmbed.__init__": {**_unset(ScEmbed.__init__, init_passed),
                             "embedding_dim (kwargs)": r2v_const.DEFAULT_EMBEDDING_DIM},
        "ScEmbed.train": _unset(ScEmbed.train, train_passed),
        "ScEmbed.encode": signature_defaults(ScEmbed.encode),
        "Region2VecDataset.__init__": signature_defaults(Region2VecDataset.__init__),
        "gensim.models.Word2Vec (not set by geniml)": {
            k: v for k, v in signature_defaults(Word2Vec.__init__).items()
            if k not in geniml_sets
            and k not in ("sentences", "corpus_file", "callbacks", "epochs", "compute_loss")},
    }

    # token bookkeeping: gensim's vocabulary = tokens seen at least min_count times in all
    lengths = np.fromiter((len(tk) for tk in tokens), dtype=np.int64, count=n_cells)
    flat = np.fromiter((x for tk in tokens for x in tk), dtype=np.int64, count=int(lengths.sum()))
    counts = np.bincount(flat, minlength=vocab_size)
    in_vocab = counts >= min_count
    n_cells_no_token = int((np.diff(indptr) == 0).sum())
    untrained_only = sum(1 for tk in tokens if not in_vocab[tk].any())
    peak_ids = np.ones(vocab_size, dtype=bool)
    peak_ids[list(res["special_tokens"].values())] = False
    res["tokens"] = {
        "total": int(flat.size),
        "per_cell_mean": float(lengths.mean()) if n_cells else 0.0,
        "per_cell_median": float(np.median(lengths)) if n_cells else 0.0,
        "per_cell_min": int(lengths.min()) if n_cells else 0,
        "in_vocabulary": int(in_vocab.sum()),
        "peaks_in_vocabulary": int(in_vocab[peak_ids].sum()),
        "peaks_below_min_count": int((~in_vocab[peak_ids]).sum()),
        "unk_in_vocabulary": bool(in_vocab[unk]),
    }
    res["n_cells_no_token"] = n_cells_no_token
    res["no_token_embedding"] = "the <unk> token's row (random initialisation unless <unk> is in the vocabulary)"
    res["n_cells_untrained_only"] = int(untrained_only)

    # ---- encode
    t = time.perf_counter()
    try:
        emb = np.asarray(model.encode(adata), dtype=np.float32)
        res["api"]["encode"] = "ScEmbed.encode(adata)"
    except Exception as exc:  # noqa: BLE001 - geniml 0.8.4 + gtars >= 0.5: see the docstring
        res["encode_fallback_reason"] = f"{type(exc).__name__}: {exc}"
        res["api"]["encode"] = ("runner: mean of ScEmbed.model.projection rows over each cell's "
                                "token ids (what ScEmbed.encode computes)")
        proj = model.model.projection
        emb = np.empty((n_cells, dim), dtype=np.float32)
        with torch.no_grad():
            for i, tk in enumerate(tokens):
                emb[i] = torch.mean(proj(torch.tensor(tk)), axis=0).numpy()
    times["encode"] = time.perf_counter() - t
    if emb.shape != (n_cells, dim):
        raise RuntimeError(f"embedding shape {emb.shape}, expected {(n_cells, dim)}")
    res["n_nonfinite_rows"] = int((~np.isfinite(emb).all(axis=1)).sum())

    t = time.perf_counter()
    np.save(out / EMBEDDING_NAME, emb)
    times["save"] = time.perf_counter() - t
    res["status"] = "ok"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("input", help=".h5ad, cells x peaks, var_names chrom_start_end")
    p.add_argument("outdir", help="output folder (created)")
    p.add_argument("--seed", type=int, default=0, help="ScEmbed.train seed; also random, numpy, torch")
    p.add_argument("--epochs", type=int, default=None,
                   help="override geniml's default epoch count (quick checks only)")
    p.add_argument("--keep-work", action="store_true", help="keep OUTDIR/_work (universe.bed, tokens.parquet)")
    args = p.parse_args(argv)

    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (RESULT_NAME, EMBEDDING_NAME):
        (out / name).unlink(missing_ok=True)
    times: dict[str, float] = {}
    res: dict[str, Any] = {
        "status": "error: not finished",
        "input": str(Path(args.input).resolve()),
        "seed": args.seed,
        "api": {
            "tokenizer": "gtars.tokenizers.Tokenizer(universe.bed)",
            "tokenize": "runner: geniml.tokenization.utils.tokenize_anndata's loop with "
                        "gtars.models.Region(chr, start, end, '')",
            "dataset": "geniml.region2vec.utils.Region2VecDataset(tokens.parquet)",
            "model": "geniml.scembed.main.ScEmbed(tokenizer=tokenizer)",
            "train": "ScEmbed.train(dataset, seed=...)",
        },
        "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "times_s": times,
    }
    rc = 0
    try:
        run(args, res, times)
    except Exception as exc:  # noqa: BLE001 - the JSON records any failure
        res["status"] = f"error: {type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
        rc = 1
    if not args.keep_work:
        shutil.rmtree(out / "_work", ignore_errors=True)
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times["total"] = time.perf_counter() - T_PROCESS
    write_json(out / RESULT_NAME, jsonable(res))
    print(f"geniml_runner: {res['status']} ({times['total']:.1f} s) -> {out / RESULT_NAME}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
