"""scEmbed corpora streamed from the store.

Two forms, with the same documents for the same ``(seed, epoch)``:

* :class:`EpochCorpusWriter` (``corpus="file"``, the default): Dask workers turn row chunks
  into shuffled documents and write them as shards in gensim's ``corpus_file``
  (LineSentence) format; one more task joins the shards, in a per-epoch random chunk order,
  into the epoch's file. The trainer asks for epoch ``e + 1`` before it trains on epoch
  ``e``, so the next corpus is written while the current one trains. Files are deleted once
  trained on; at most two epochs are on disk at a time.
* :class:`ShuffledCorpus` (``corpus="iterable"``): a re-iterable that reads the store in the
  client process and reshuffles on every ``__iter__``, for small data.

Memory: a worker holds one row chunk and its documents; the client holds neither (gensim
streams the file). The corpus folder must be visible to the workers and the client alike:
local disk for a local cluster, shared storage for a multi-node one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..ops.corpus import MAX_TOKENS, encode_lines, iter_documents, shuffled_documents, token_keys, token_width
from ..train.data import StoreRows


def _same(x):
    return x


def shared(client, obj, name: str):
    """``obj`` as one future that many tasks use, and that survives the loss of a worker.

    ``client.scatter`` would do the first, not the second: scattered data is held by workers
    only (the active memory manager soon keeps one replica), and a worker killed while it
    holds it loses it for good, failing every task that needs it. A task that returns
    ``obj`` keeps ``obj`` in its spec on the scheduler, which recomputes it when lost.
    """
    return client.submit(_same, obj, pure=False, key=f"scembed-{name}-{uuid.uuid4().hex[:8]}")


def chunk_order(n_chunks: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits the row chunks (cells within a chunk are shuffled too)."""
    return np.random.default_rng([seed, epoch, 0x5CE]).permutation(n_chunks)


def chunk_documents(rows: StoreRows, k: int, keep: np.ndarray, seed: int, epoch: int,
                    max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """The shuffled documents of row chunk ``k`` at ``epoch`` (see :func:`shuffled_documents`)."""
    m, _ = rows.read_chunk(k)
    return shuffled_documents(m, keep, np.random.default_rng([seed, epoch, k]), max_tokens)


def _write_shard(rows: StoreRows, k: int, keep: np.ndarray, seed: int, epoch: int, path: str,
                 max_tokens: int) -> tuple[str, int, int]:
    tokens, bounds = chunk_documents(rows, k, keep, seed, epoch, max_tokens)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(encode_lines(tokens, bounds, token_width(rows.n_vars)))
    os.replace(tmp, path)
    return path, len(bounds) - 1, int(tokens.size)


def _join_shards(shards: list[tuple[str, int, int]], path: str) -> tuple[str, int, int]:
    """Concatenate the shards into the epoch's file, then remove them.

    Idempotent, so Dask may run it again after losing the worker that ran it: the shards are
    removed only once the joined file is in place, and a rerun that finds the file in place
    and shards gone (the first run died while removing them) keeps that file, which was
    complete when it was renamed into place."""
    result = path, sum(s[1] for s in shards), sum(s[2] for s in shards)
    if os.path.exists(path) and not all(os.path.exists(s[0]) for s in shards):
        for shard, _, _ in shards:
            if os.path.exists(shard):
                os.remove(shard)
        return result
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as out:
        for shard, _, _ in shards:
            with open(shard, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    os.replace(tmp, path)
    for shard, _, _ in shards:
        os.remove(shard)
    return result


class EpochCorpusWriter:
    """Writes one LineSentence file per epoch with Dask tasks (see the module docstring).

    Parameters
    ----------
    rows
        The cells and peaks to read (counts are binarised).
    keep
        Boolean mask over ``rows``' peaks: the vocabulary.
    folder
        Where epoch files go; created if missing.
    client
        A ``distributed.Client``.
    """

    def __init__(self, rows: StoreRows, keep: np.ndarray, folder: str | Path, client, *, seed: int = 0,
                 max_tokens: int = MAX_TOKENS):
        self.rows, self.keep, self.client = rows, np.asarray(keep, bool), client
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.seed, self.max_tokens = seed, max_tokens
        self._rows_f = shared(client, rows, "rows")
        self._keep_f = shared(client, self.keep, "vocabulary")

    def submit(self, epoch: int):
        """Start writing epoch ``epoch``; returns a future of ``(path, n_documents, n_tokens)``."""
        order = [k for k in chunk_order(self.rows.n_chunks, self.seed, epoch) if self.rows.chunk_cells[k]]
        shards = [self.client.submit(_write_shard, self._rows_f, int(k), self._keep_f, self.seed, epoch,
                                     str(self.folder / f"epoch{epoch:04d}-chunk{k:06d}.txt"), self.max_tokens,
                                     pure=False, key=f"scembed-shard-{epoch}-{k}-{uuid.uuid4().hex[:6]}")
                  for k in order]
        return self.client.submit(_join_shards, shards, str(self.folder / f"epoch{epoch:04d}.txt"),
                                  pure=False, key=f"scembed-corpus-{epoch}-{uuid.uuid4().hex[:6]}")


class ShuffledCorpus:
    """A re-iterable corpus for gensim: every ``__iter__`` is the next epoch, reshuffled.

    Yields the same documents, in the same order, as :class:`EpochCorpusWriter` writes for
    that epoch, read chunk by chunk in this process.
    """

    def __init__(self, rows: StoreRows, keep: np.ndarray, *, seed: int = 0, max_tokens: int = MAX_TOKENS,
                 first_epoch: int = 0):
        self.rows, self.keep = rows, np.asarray(keep, bool)
        self.seed, self.max_tokens = seed, max_tokens
        self.keys = token_keys(rows.n_vars)
        self.epoch = first_epoch

    def documents(self, epoch: int):
        for k in chunk_order(self.rows.n_chunks, self.seed, epoch):
            if self.rows.chunk_cells[k]:
                tokens, bounds = chunk_documents(self.rows, int(k), self.keep, self.seed, epoch, self.max_tokens)
                yield from iter_documents(tokens, bounds, self.keys)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.documents(epoch)


def chunk_doc_freq(rows: StoreRows, k: int) -> np.ndarray:
    """Training cells of row chunk ``k`` in which each region is open (the vocabulary pass)."""
    m, _ = rows.read_chunk(k)
    return np.bincount(m.indices, minlength=rows.n_vars).astype(np.int64)
