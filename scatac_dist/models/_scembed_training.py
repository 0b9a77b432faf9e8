"""scEmbed's training run: the store's peaks as regions, the Dask client, and word2vec one
epoch at a time with the learning rate decayed per epoch.

gensim is called once per epoch with ``start_alpha = alpha(e)`` and ``end_alpha =
alpha(e + 1)``. With the file corpus (:class:`.scembed_corpus.EpochCorpusWriter`) epoch
``e + 1`` is written by the Dask workers while epoch ``e`` trains, and each file is deleted
once trained on; the iterable corpus (:class:`.scembed_corpus.ShuffledCorpus`) reshuffles on
every pass.

Restart state (:class:`EpochState`): after every finished epoch the model (vectors, vocabulary,
word2vec's random state), the epoch count, the history and the vocabulary mask are pickled
into one file in the stage's resume folder (:meth:`scatac_dist.store.Atlas.resume_state`),
written aside and renamed into place, so a killed run leaves the last finished epoch's
state whole. A rerun with the same parameters on the same counts and cells loads it and
trains on from the next epoch, with the learning rate that epoch has in the uninterrupted
schedule (the rate depends on the epoch number only) and the documents of that epoch (they
depend on the seed and the epoch number only).
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import uuid
from collections.abc import Callable
from pathlib import Path

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
    from distributed import Client

    try:
        return Client.current()
    except ValueError:
        raise RuntimeError("scEmbed runs on a Dask cluster: start one first (scatac_dist.get_client())") from None


class EpochState:
    """scEmbed's restart state in ``folder``: one pickle (``state.pkl``) of the word2vec model
    after the last finished epoch, with what training needs to go on (see the module docstring).

    :meth:`save` writes a temporary file, flushes it to disk and renames it over the previous
    state, so a kill at any moment leaves one whole state: the previous epoch's or this one's.
    """

    VERSION = 1
    NAME = "state.pkl"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / self.NAME

    def load(self) -> dict | None:
        """The saved state, or ``None`` when there is none (or it cannot be read)."""
        if not self.path.exists():
            return None
        try:
            with open(self.path, "rb") as fh:
                state = pickle.load(fh)
        except Exception as exc:  # a state we cannot read is no reason to fail: start afresh
            logger.warning("scembed: cannot read the restart state %s (%s); starting afresh", self.path, exc)
            return None
        if not isinstance(state, dict) or state.get("version") != self.VERSION:
            logger.warning("scembed: restart state %s is of another version; starting afresh", self.path)
            return None
        return state

    def save(self, w2v, *, epochs_done: int, history: list, train_seconds: float, **extra) -> None:
        """Replace the state with ``w2v`` after ``epochs_done`` epochs (atomically)."""
        state = {"version": self.VERSION, "epochs_done": int(epochs_done), "history": list(history),
                 "train_seconds": float(train_seconds), "model": w2v, **extra}
        tmp = self.folder / f".{self.NAME}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as fh:
                pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()


def train_epochs(w2v, corpus, *, epochs: int, alpha: Callable[[int], float], total_words: int, history: list,
                 progress: bool = True, first_epoch: int = 0,
                 on_epoch: Callable[[int, float], None] | None = None) -> None:
    """Train ``w2v`` for epochs ``first_epoch .. epochs - 1`` on ``corpus`` (an
    :class:`EpochCorpusWriter` or a re-iterable), appending one record per epoch to ``history``
    (rate, words, seconds, words/s, seconds spent waiting for the corpus), then calling
    ``on_epoch(epochs_done, seconds)`` (the restart state is saved there)."""
    from ..progress import bar as progress_bar

    bar = progress_bar(total=epochs, initial=first_epoch, desc="scEmbed epochs", unit="epoch", enabled=progress)

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
            nxt = corpus.submit(first_epoch) if first_epoch < epochs else None
            for e in range(first_epoch, epochs):
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
                if on_epoch is not None:
                    on_epoch(e + 1, dt + wait)
        else:
            corpus.epoch = first_epoch  # the documents of epoch e depend on (seed, e) only
            for e in range(first_epoch, epochs):
                tt = time.perf_counter()
                _, raw = w2v.train(corpus_iterable=corpus, total_words=total_words, epochs=1,
                                   start_alpha=alpha(e), end_alpha=alpha(e + 1))
                dt = time.perf_counter() - tt
                log(e, None, raw, dt, 0.0)
                if on_epoch is not None:
                    on_epoch(e + 1, dt)
    finally:
        bar.close()
