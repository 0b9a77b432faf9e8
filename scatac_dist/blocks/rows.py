"""Row-block work on an embedding that the client already holds (O(n x d))."""

from __future__ import annotations

import numpy as np

__all__ = ["transform_in_parallel"]


def _transform(model, E):
    return model.transform(E)


def transform_in_parallel(model, E: np.ndarray, rows: int = 50_000) -> np.ndarray:
    """``model.transform(E)`` in row blocks on the Dask workers (in this process without a
    cluster). The model travels to each worker once."""
    try:
        from distributed import default_client

        client = default_client()
    except ValueError:
        return model.transform(E)
    fut = client.scatter(model, broadcast=False, hash=False)
    parts = [client.submit(_transform, fut, E[a:a + rows], pure=False) for a in range(0, E.shape[0], rows)]
    return np.concatenate(client.gather(parts))
