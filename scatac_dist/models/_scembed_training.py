"""scEmbed's training run: the store's peaks as regions, the Dask client, and word2vec one
epoch at a time with the learning rate decayed per epoch.

gensim is called once per epoch with ``start_alpha = alpha(e)`` and ``end_alpha =
alpha(e + 1)``. With the file corpus (:class:`.scembed_corpus.EpochCorpusWriter`) epoch
``e + 1`` is written by the Dask workers while epoch ``e`` trains, and each file is deleted
once trained on; the iterable corpus (:class:`.scembed_corpus.ShuffledCorpus`) reshuffles on
every pass.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import pandas as pd

from ..store import Atlas
from .scembed_corpus import EpochCorpusWriter

logger = logging.getLogger("scatac_dist")


def store_peaks(atlas: Atlas, what: str) -> pd.DataFrame:
    """``chr``, ``start``, ``end`` of the store's peaks (row order), or the clear error of
    :func:`scatac_dist.io.require_intervals` when its features have no coordinates."""
    from ..io import require_intervals

    return require_intervals(atlas, what).reset_index(drop=True)


def dask_client():
    """The current Dask client; scEmbed's corpus and encoding passes run on it."""
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        raise RuntimeError("scEmbed runs on a Dask cluster: start one first (scatac_dist.get_client())") from None


def train_epochs(w2v, corpus, *, epochs: int, alpha: Callable[[int], float], total_words: int, history: list,
                 progress: bool = True) -> None:
    """Train ``w2v`` for ``epochs`` epochs on ``corpus`` (an :class:`EpochCorpusWriter` or a
    re-iterable), appending one record per epoch to ``history`` (rate, words, seconds, words/s,
    seconds spent waiting for the corpus)."""
    from ..progress import bar as progress_bar

    bar = progress_bar(total=epochs, desc="scEmbed epochs", unit="epoch", enabled=progress)

    def log(e, n_docs, raw, dt, wait):
        rec = {"epoch": e, "alpha": alpha(e), "words": int(raw), "seconds": dt,
               "words_per_s": float(raw / max(dt, 1e-9)), "waited_for_corpus_s": wait}
        if n_docs is not None:
            rec["documents"] = int(n_docs)
        history.append(rec)
        logger.debug("scembed epoch %d: %.0f words/s", e, rec["words_per_s"])
        bar.update(1)
        bar.set_postfix(words_per_s=f"{rec['words_per_s']:.3g}")

    try:
        if isinstance(corpus, EpochCorpusWriter):
            nxt = corpus.submit(0)
            for e in range(epochs):
                tw = time.perf_counter()
                path, n_docs, n_tok = nxt.result()
                wait = time.perf_counter() - tw
                nxt = corpus.submit(e + 1) if e + 1 < epochs else None
                tt = time.perf_counter()
                _, raw = w2v.train(corpus_file=path, total_words=n_tok, epochs=1,
                                   start_alpha=alpha(e), end_alpha=alpha(e + 1))
                dt = time.perf_counter() - tt
                os.remove(path)
                log(e, n_docs, raw, dt, wait)
        else:
            for e in range(epochs):
                tt = time.perf_counter()
                _, raw = w2v.train(corpus_iterable=corpus, total_words=total_words, epochs=1,
                                   start_alpha=alpha(e), end_alpha=alpha(e + 1))
                log(e, None, raw, time.perf_counter() - tt, 0.0)
    finally:
        bar.close()
