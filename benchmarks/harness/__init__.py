"""What the benchmark scripts share, held once.

Small modules, each named for what it does:

* :mod:`harness.memory`: process-tree RSS, sampled by a thread (peaks overall, per stage,
  per process and role);
* :mod:`harness.procs`: launching a measured process tree (time, peak RSS, memory and time
  limits) and a script's own ``child`` runs, read back from the JSON they write;
* :mod:`harness.children`: the child side of those runs (a sampled LocalCluster, the status
  of a run that may fail);
* :mod:`harness.results`: JSON result files read, merged and written atomically;
* :mod:`harness.environment`: versions and defaults of installed packages, for the record;
* :mod:`harness.timing`: a stopwatch;
* :mod:`harness.stores`: the real data sets and the synthetic atlases, prepared in
  ``benchmarks/work`` (or ``$SCATAC_BENCH_SCRATCH``);
* :mod:`harness.report`: the marked blocks of ``benchmarks/RESULTS.md`` and the tables beside
  them;
* :mod:`harness.plots`: matplotlib without a display;
* :mod:`harness.reads`: bytes a process tree reads (from zarr stores, counted by the hook in
  ``harness/hooks``; and every process's ``read_chars``), and the environment that turns the
  hooks on in a child;
* :mod:`harness.tasks`: the Dask tasks a run's scheduler recorded (``hooks/scatac_bench_tasks.py``),
  summed per stage.

``sccase_runner.py`` runs under the scCASE virtualenv (numpy 1.26, psutil 5.9, no
``scatac_dist``): ``memory``, ``procs``, ``results``, ``environment`` and ``timing`` import the
standard library and psutil only (numpy, where needed, inside a function), and this
``__init__`` imports nothing but ``pathlib``; keep them so. ``stores``, ``children``,
``report`` and ``plots`` need the main virtualenv (``scatac_dist``, distributed, matplotlib;
imported inside their functions).
"""

from pathlib import Path

#: ``benchmarks/``
BENCH = Path(__file__).resolve().parent.parent
#: committed figures: JSON, Markdown tables, PNG plots
RESULTS = BENCH / "results"
#: inputs and scratch of the runs (ignored by git)
WORK = BENCH / "work"
