"""Row-block work on an embedding that the client already holds (O(n x d))."""

from __future__ import annotations

import numpy as np

__all__ = ["transform_in_parallel"]


def _transform(model, E):
    return model.transform(E)


def transform_in_parallel(model, E: np.ndarray, rows: int = 50_000) -> np.ndarray:
    """``model.transform(E)`` in row blocks on the Dask workers (in this process without a
    cluster). The model travels to each worker once (as one task of the graph, so a worker
    that dies does not take it with it: see :func:`share`)."""
    try:
        from distributed import Client

        Client.current()
    except ValueError:
        return model.transform(E)
    import dask
    from dask import delayed

    shared = delayed(model, pure=False, traverse=False)
    parts = [delayed(_transform, pure=False)(shared, E[a:a + rows]) for a in range(0, E.shape[0], rows)]
    return np.concatenate(dask.compute(*parts))
