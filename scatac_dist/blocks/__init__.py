"""The Dask toolkit that ``pp``, ``tl`` and ``models`` share: lazy views of X's row blocks,
reductions over them in fixed trees, small arrays sent once to every task, and row-block
work on gathered embeddings. No AnnData and no store: arrays in, arrays (or delayed values) out.
"""

from .reduce import per_cell, per_peak, tree_reduce, tree_sum
from .rows import transform_in_parallel
from .share import cache_fits, share, small_array
from .views import view

__all__ = ["view", "per_cell", "per_peak", "tree_reduce", "tree_sum", "share", "small_array", "cache_fits",
           "transform_in_parallel"]
