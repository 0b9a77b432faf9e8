# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-slurm test-container lint bench-install bench-ingest bench-scaling bench-quality bench-sccase-install bench-multiome-install bench-geniml-install clean

$(STAMP): pyproject.toml deploy/docker/requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: any looser range pulls several GB of CUDA packages here
	$(PY) -m pip install -q torch==2.13.0
	# the runtime dependencies at the versions the image pins (tested together; the extras resolve freely)
	$(PY) -m pip install -q -e ".[test]" -c deploy/docker/requirements.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/scatac-dist demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# the long tests (crash tests at every publishing step, memory bounds), one pytest process per
# module: the memory-bound tests measure their workers' peak memory and start their own
# clusters, and run alone as they were measured; GPU tests skip without a GPU
SLOW_MODULES = $(shell grep -l "mark.slow" tests/test_*.py)
test-slow: install
	set -e; for m in $(SLOW_MODULES); do $(PY) -m pytest -m "slow and not slurm" $$m $(PYTEST_ARGS) || [ $$? -eq 5 ]; done

lint: install
	$(VENV)/bin/ruff check scatac_dist tests benchmarks

bench-install: install
	$(PY) -m pip install -q -e ".[bench]"

bench-ingest: bench-install
	$(PY) benchmarks/bench_ingest.py

# A small version of the scaling report (mouse preset, 20k peaks, 2k and 5k cells: a few minutes
# on 2 cores), written to benchmarks/results/scaling_small.{json,md} beside the full run's files.
# The full run (issue 27; hours): $(PY) benchmarks/bench_scaling.py --preset mouse human
#   --peaks 100000 500000 --sizes 10000 100000 1000000 --epoch-cells 100000
bench-scaling: bench-install
	$(PY) benchmarks/bench_scaling.py --small

bench-quality: bench-install
	$(PY) benchmarks/bench_quality.py

# The docs site (docs/: Sphinx + MyST-NB, see docs/contributing.md): installs the docs extra,
# executes the tutorial on the real BM0828 data (../shared/data or SCATAC_DIST_DATA) and fails
# on any warning. -E: a fresh environment every time, so the API pages follow the current
# docstrings and the tutorial runs on the current code. Output: docs/_build/html/index.html.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

.PHONY: docs
docs: $(DOCS_STAMP)
	$(PY) -m sphinx -W --keep-going -E -b html docs docs/_build/html

# The authors' scCASE package (peer for benchmarks/sccase_runner.py) in a venv of its own: it
# needs scipy < 1.14 (sparse .A) and episcanpy 0.3.x (0.4.0's episcanpy.api does not import).
# No torch. Run the runner with $(SCCASE_VENV)/bin/python.
SCCASE_VENV ?= benchmarks/work/sccase-venv
bench-sccase-install:
	test -x $(SCCASE_VENV)/bin/python || python3 -m venv $(SCCASE_VENV)
	$(SCCASE_VENV)/bin/python -m pip install -q scCASE==0.2.5 episcanpy==0.3.2 \
		numpy==1.26.4 scipy==1.13.1 pandas==2.2.2 anndata==0.10.8 scanpy==1.10.1 scikit-learn==1.5.0 \
		louvain==0.8.2 igraph==0.10.8 leidenalg==0.10.1 kneed==0.8.5 numba==0.59.1 llvmlite==0.42.0 \
		h5py==3.11.0 zarr==2.18.2 numcodecs==0.12.1 psutil==5.9.8
	$(SCCASE_VENV)/bin/python -c "import scCASE, inspect; print('scCASE.run', inspect.signature(scCASE.run))"

# The multiome peers (benchmarks/multiome_peers_runner.py: scvi-tools MultiVI, muon WNN, MOFA+
# via mofapy2) in a venv of their own. torch first and pinned: any looser range pulls several
# GB of CUDA packages. pynndescent 0.5.13 and scipy 1.16: pynndescent 0.7 (and scipy 1.17)
# hand scanpy 1.11.5's pp.neighbors csr_arrays, which it cannot read (no .getnnz).
# Run the runner with $(MULTIOME_VENV)/bin/python.
MULTIOME_VENV ?= benchmarks/work/multiome-venv
bench-multiome-install:
	test -x $(MULTIOME_VENV)/bin/python || python3.11 -m venv $(MULTIOME_VENV)
	$(MULTIOME_VENV)/bin/python -m pip install -q torch==2.13.0
	$(MULTIOME_VENV)/bin/python -m pip install -q scvi-tools==1.4.2 muon==0.1.9 mofapy2==0.7.5 \
		mudata==0.3.10 anndata==0.12.19 scanpy==1.11.5 numpy==2.4.6 scipy==1.16.3 pandas==2.3.3 \
		scikit-learn==1.9.1 pynndescent==0.5.13 umap-learn==0.5.12 numba==0.68.1 llvmlite==0.50.0 \
		leidenalg==0.12.0 igraph==1.0.0 h5py==3.16.0 lightning==2.6.6 pyro-ppl==1.9.2 zarr==3.1.6
	$(MULTIOME_VENV)/bin/python -c "import importlib.metadata as m; \
		print(' '.join(p + '=' + m.version(p) for p in ('torch', 'scvi-tools', 'muon', 'mofapy2', 'mudata', \
		'anndata', 'scanpy', 'scipy', 'pynndescent', 'scikit-learn', 'leidenalg', 'igraph')))"

# The scEmbed authors' geniml package (peer for benchmarks/geniml_runner.py) in a venv of its
# own. torch first and pinned: any looser range pulls several GB of CUDA packages.
# sentence-transformers pinned (langchain-huggingface, from geniml[ml], otherwise makes pip
# backtrack through its releases). geniml 0.8.4's tokenize_anndata and ScEmbed.encode do not
# run with this gtars (nor with any release tried, 0.4.0 to 0.10.0); the runner does their
# work itself (see its docstring).
# Run the runner with $(GENIML_VENV)/bin/python.
GENIML_VENV ?= benchmarks/work/geniml-venv
bench-geniml-install:
	test -x $(GENIML_VENV)/bin/python || python3.11 -m venv $(GENIML_VENV)
	$(GENIML_VENV)/bin/python -m pip install -q torch==2.13.0
	$(GENIML_VENV)/bin/python -m pip install -q "geniml[ml]==0.8.4" gtars==0.10.0 gensim==4.4.0 \
		numpy==2.4.6 scipy==1.17.1 pandas==2.3.3 anndata==0.12.19 scanpy==1.11.5 scikit-learn==1.9.1 \
		pyarrow==26.0.1 h5py==3.16.0 zarr==2.18.7 transformers==4.57.6 sentence-transformers==5.1.2 \
		huggingface_hub==0.36.2
	$(GENIML_VENV)/bin/python -c "from geniml.scembed.main import ScEmbed; import importlib.metadata as m; \
		print(' '.join(p + '=' + m.version(p) for p in ('geniml', 'gtars', 'gensim', 'torch', 'numpy', \
		'scipy', 'anndata', 'pyarrow')))"

clean:
	rm -rf out benchmarks/work .pytest_cache

# The tests marked `slurm` against a real single-node SLURM started here (tests/slurm/local-slurm.sh:
# installs slurm-wlm and munge when missing, needs root) and stopped by its PIDs afterwards.
# Without root the SLURM does not start and the tests skip, saying why.
SLURM_DIR ?= /tmp/scatac-dist-slurm
test-slurm: install
	@rm -rf $(SLURM_DIR); mkdir -p $(SLURM_DIR); \
	if tests/slurm/local-slurm.sh start $(SLURM_DIR); then export SLURM_CONF=$(SLURM_DIR)/slurm.conf; \
	else echo "test-slurm: no local SLURM (see above): the slurm tests will skip"; fi; \
	$(PY) -m pytest -m slurm tests/test_slurm.py $(PYTEST_ARGS); rc=$$?; \
	tests/slurm/local-slurm.sh stop $(SLURM_DIR); exit $$rc

# The tests marked `container`: build the image of deploy/docker with podman from a Debian
# base made here (debootstrap) and wheels from this venv's pins, then run it with
# --network none (tests/container/; installs podman, buildah, runc and debootstrap when missing)
test-container: install
	$(PY) -m pytest -m container tests/test_container.py $(PYTEST_ARGS)
