"""Run by every Python process whose ``PYTHONPATH`` holds this folder: the scaling benchmark's
measured children, their Dask workers and training ranks (``harness.reads.hook_env``).

With ``SCATAC_BENCH_READS_DIR`` set, it counts the bytes zarr reads from local stores
(:mod:`scatac_bench_reads`); without it, it does nothing. It imports nothing heavy: zarr is
patched when (and if) the process imports it.
"""

import os

if os.environ.get("SCATAC_BENCH_READS_DIR"):
    import scatac_bench_reads

    scatac_bench_reads.install()
