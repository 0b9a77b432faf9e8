"""tl.jaccard: exact dense Jaccard against NumPy, blockwise top-k against exact top-k."""

from __future__ import annotations

import numpy as np
import pytest

from scatac_dist import tl
from scatac_dist.datasets import SynthParams, generate_rows, synthesize
from scatac_dist.ops.jaccard import merge_topk, topk_rows
from scatac_dist.store import open_atlas

P = SynthParams(n_cells=3000, n_peaks=4000, n_clusters=5, n_lineages=2, fragments=300, signal=0.4, seed=5)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("jac") / "s.zarr"
    synthesize(out, P, chunk_rows=700, client=client, progress=False)  # 5 row blocks, the last short
    return open_atlas(out, chunk_rows=700)


def reference(X: np.ndarray) -> np.ndarray:
    B = X > 0
    inter = B.astype(np.int64) @ B.T.astype(np.int64)
    size = B.sum(1)
    union = size[:, None] + size[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def test_merge_keeps_value_then_index_order():
    S = np.array([[0.5, 0.2, 0.5, 0.9, 0.2, 0.5]])
    whole = topk_rows(S, 4)
    parts = merge_topk(topk_rows(S[:, :3], 4), topk_rows(S[:, 3:], 4, offset=3), 4)
    np.testing.assert_array_equal(whole[0], [[3, 0, 2, 5]])
    np.testing.assert_array_equal(parts[0], whole[0])
    np.testing.assert_array_equal(parts[1], whole[1])


def test_exact_and_blockwise_topk(atlas, client):
    X = generate_rows(P, 0, P.n_cells).toarray()
    J = reference(X)
    got = tl.jaccard(atlas, k=None)
    np.testing.assert_allclose(got, J, rtol=0, atol=1e-12)

    k = 20
    G = tl.jaccard(atlas, k=k, sub_rows=256)
    assert G.shape == (P.n_cells, P.n_cells)
    Jx = J.copy()
    np.fill_diagonal(Jx, -1.0)  # a cell is not its own neighbour
    idx, val = topk_rows(Jx, k)
    for i in range(P.n_cells):
        row = G.getrow(i)
        keep = val[i] > 0
        # same neighbours in the same order (value, then lower index), same values
        np.testing.assert_array_equal(row.indices, idx[i][keep])
        np.testing.assert_array_equal(row.data, val[i][keep])
    stored = atlas.read("obsp/jaccard")                        # the graph written is the one returned
    assert stored.shape == G.shape and (stored != G).nnz == 0


def test_jaccard_bad_parameters(atlas):
    with pytest.raises(ValueError, match="between 1 and the number of cells"):
        tl.jaccard(atlas, k=P.n_cells)
