"""scEmbed documents: each cell is a sentence of its accessible regions, in random order.

Pure NumPy/SciPy kernels used by the corpus writers in :mod:`scatac_dist.models.scembed_corpus`.

Tokens are compact: peak ``j`` of the store is written as ``j`` in decimal, zero-padded to a
fixed width (:func:`token_width`). The model's vocabulary is renamed to the paper's
``chr_start_end`` words when it is saved; a compact corpus is a third the size of one
spelled out, which matters when it is regenerated every epoch.

gensim truncates a sentence at 10,000 tokens (``MAX_WORDS_IN_BATCH``), so a cell with more
regions becomes several documents of at most ``max_tokens``. Region order within a cell is
random anyway, so splitting loses only the context pairs that would have straddled the cut.
"""

from __future__ import annotations

from collections.abc import Iterator

import numba
import numpy as np
import scipy.sparse as sp

MAX_TOKENS = 10_000  # gensim.models.word2vec.MAX_WORDS_IN_BATCH


def token_width(n_vars: int) -> int:
    """Digits needed to write every peak index ``0 .. n_vars-1``."""
    return max(1, len(str(max(int(n_vars) - 1, 0))))


def token_keys(n_vars: int) -> np.ndarray:
    """The token string of every peak (object array), as written in corpus files."""
    w = token_width(n_vars)
    return np.array([f"{j:0{w}d}" for j in range(n_vars)], dtype=object)


@numba.njit(cache=True, nogil=True)
def _shuffle_segments(vals: np.ndarray, indptr: np.ndarray, u: np.ndarray) -> None:
    """Fisher-Yates within every segment ``vals[indptr[r]:indptr[r+1]]``, in place, drawing
    from the uniforms ``u`` (one per element): O(n), where a sort by random keys is O(n log n)."""
    for r in range(indptr.size - 1):
        a = indptr[r]
        for i in range(indptr[r + 1] - 1, a, -1):
            j = a + int(u[i] * (i - a + 1))
            vals[i], vals[j] = vals[j], vals[i]


def shuffled_documents(m: sp.csr_matrix, keep: np.ndarray, rng: np.random.Generator,
                       max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """The documents of one row block, with cells and their regions in random order.

    Parameters
    ----------
    m
        Cells x peaks; any stored nonzero is a region with signal.
    keep
        Boolean mask over peaks: the vocabulary (others are dropped from the documents).
    rng
        Source of both permutations (cells, and regions within each cell).
    max_tokens
        Longest document; longer cells are split.

    Returns
    -------
    tokens, bounds
        Peak indices of all documents back to back, and document ``d`` is
        ``tokens[bounds[d]:bounds[d + 1]]``. Cells without vocabulary regions give no document.
    """
    m = sp.csr_matrix(m)
    m.eliminate_zeros()
    ok = keep[m.indices]
    cols = m.indices[ok].astype(np.int64)
    kept = np.concatenate([[0], np.cumsum(ok)])[m.indptr]  # kept entries before each row
    lengths = np.diff(kept)
    # cells in random order: gather each row's segment at its new place
    perm = rng.permutation(m.shape[0])
    lengths = lengths[perm]
    new_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    src = np.repeat(kept[:-1][perm] - new_ptr[:-1], lengths) + np.arange(new_ptr[-1])
    tokens = cols[src]
    _shuffle_segments(tokens, new_ptr, rng.random(tokens.size))
    lengths = lengths[lengths > 0]
    # split every cell into ceil(len / max_tokens) documents of near-equal length
    pieces = -(-lengths // max_tokens)
    doc_len = np.repeat(lengths // pieces, pieces)
    extra = np.repeat(lengths % pieces, pieces)
    within = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    doc_len = doc_len + (within < extra)
    bounds = np.concatenate([[0], np.cumsum(doc_len)]).astype(np.int64)
    return tokens, bounds


def encode_lines(tokens: np.ndarray, bounds: np.ndarray, width: int) -> bytes:
    """Documents as LineSentence text: fixed-width tokens, space-separated, one per line.

    Vectorised: every token becomes ``width`` digits and one separator byte, so a block of
    a million tokens is a few array operations rather than a million string joins.
    """
    n = tokens.size
    if n == 0:
        return b""
    buf = np.empty((n, width + 1), np.uint8)
    t = tokens.astype(np.int64)
    for d in range(width - 1, -1, -1):
        buf[:, d] = 48 + t % 10
        t //= 10
    buf[:, width] = 32  # space
    buf[bounds[1:] - 1, width] = 10  # newline ends each document
    return buf.tobytes()


def iter_documents(tokens: np.ndarray, bounds: np.ndarray, keys: np.ndarray) -> Iterator[list[str]]:
    """Documents as lists of token strings (the iterable-corpus form)."""
    words = keys[tokens]
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield words[a:b].tolist()
