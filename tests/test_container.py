"""The image of deploy/docker: built here with podman, then run with `--network none`: its
entrypoint, the default pipeline on a small generated atlas (the same results as this venv on
the same parameters), its user, labels and the commands the Kubernetes manifests run.

No registry is reachable here: tests/container/podman-image.sh makes the base image with
debootstrap and installs the image's Python packages from a wheelhouse built on this host (the
pins of deploy/docker/requirements.txt), all under a temporary folder removed afterwards. That
needs root (and installs podman, buildah, runc and debootstrap when missing); without root every
test here skips, saying why. As root a failed build fails the tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from scatac_dist.store import open_atlas

from .conftest import REPO

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

BIN = Path(sys.executable).parent
CLI = str(BIN / "scatac-dist")
SCRIPT = REPO / "tests" / "container" / "podman-image.sh"
IMAGE = "localhost/scatac-dist:test"
# no CAP_SYS_RESOURCE here (GUIDE.md §4): podman's default limits cannot be raised
RUN = ["run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# the demo atlas: small, its known cell types recoverable, written and read in 3 row chunks
# (store.chunk-rows) over 2 workers
SYNTH = ["synth", "--cells", "1500", "--peaks", "3000", "--clusters", "4", "--seed", "0"]
PIPELINE = ["run", "--n-clusters", "4"]
CHUNKS = {"DASK_SCATAC_DIST__STORE__CHUNK_ROWS": "500"}


def _say(request, line: str) -> None:
    """A line on the terminal whatever the capture (-s or not): timings and the image's size."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(f"container: {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(f"container: {line}")


class Podman:
    def __init__(self, env: dict[str, str]):
        self.env = env

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=self.env)


@pytest.fixture(scope="module")
def podman(tmp_path_factory, request):
    """podman pointed at a storage of its own holding the image (built once for the module)."""
    if os.geteuid() != 0:
        why = "podman is not installed and cannot be installed without root" if shutil.which("podman") is None \
            else "the image's build needs root (debootstrap of its base image, rootful podman)"
        pytest.skip(f"not root: {why}; run `make test-container` as root")
    folder = tmp_path_factory.mktemp("podman")
    t0 = time.monotonic()
    try:
        # its own process group, so that a build past the timeout goes with all its children
        p = subprocess.Popen([str(SCRIPT), "build", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PY": sys.executable}, start_new_session=True)
        try:
            out, err = p.communicate(timeout=1500)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            pytest.fail(f"the image's build took over 1500 s:\n{err[-5000:]}")
        for line in err.splitlines():
            if line.startswith("podman-image: "):
                _say(request, line.removeprefix("podman-image: "))
        _say(request, f"set-up in all: {time.monotonic() - t0:.0f} s")
        assert p.returncode == 0, f"the image was not built (as root this must work):\n{err[-5000:]}"
        yield Podman({**os.environ, **dict(re.findall(r"(CONTAINERS_\w+)=(\S+)", out))})
    finally:
        subprocess.run([str(SCRIPT), "clean", str(folder)], timeout=300)


def test_image_runs_the_cli(podman, request):
    """`podman run IMAGE --help`: the entrypoint is scatac-dist and its commands are listed."""
    t0 = time.monotonic()
    r = podman(*RUN, IMAGE, "--help")
    _say(request, f"podman run --help: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scatac-dist: atlas-scale single-cell ATAC-seq analysis on Dask" in r.stdout
    commands = r.stdout.split("Commands:")[1]
    assert all(c in commands for c in ("synth", "ingest", "run", "scale", "sccase", "scembed"))


def test_pipeline_in_the_container_equals_the_host_run(podman, tmp_path, request):
    """synth then run inside the container, on a host folder mounted at /data (2 workers): the
    embedding and the clusters are there, recover the generated cell types, and equal those of the
    same two commands run from this venv."""
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 1000, 1000)  # the image's user
    mount = ["-v", f"{data}:/data", *[f"--env={k}={v}" for k, v in CHUNKS.items()]]
    t0 = time.monotonic()
    for args in (SYNTH + ["-o", "/data/a.zarr"], PIPELINE + ["/data/a.zarr"]):
        r = podman(*RUN, *mount, IMAGE, "--workers", "2", "--no-progress", *args)
        assert r.returncode == 0, f"{args[0]} in the container failed:\n{r.stderr[-4000:]}"
        assert "3 row chunks of 500 cells" in r.stdout, r.stdout  # the store's description
    _say(request, f"synth + run in the container: {time.monotonic() - t0:.1f} s")

    host = tmp_path / "host"
    host.mkdir()
    t0 = time.monotonic()
    for args in (SYNTH + ["-o", str(host / "a.zarr")], PIPELINE + [str(host / "a.zarr")]):
        r = subprocess.run([CLI, "--workers", "2", "--no-progress", *args], capture_output=True, text=True,
                           timeout=600, cwd=host, env={**os.environ, **CHUNKS})
        assert r.returncode == 0, f"{args[0]} on the host failed:\n{r.stderr[-4000:]}"
    _say(request, f"synth + run on the host: {time.monotonic() - t0:.1f} s")

    from sklearn.metrics import adjusted_rand_score

    box, ref = open_atlas(data / "a.zarr"), open_atlas(host / "a.zarr")
    assert {"X_lsi", "X_spectral", "X_umap"} <= set(box.keys("obsm"))
    assert {"leiden", "kmeans", "celltype"} <= set(box.obs.columns)
    truth = box.obs["celltype"].astype(str).to_numpy()
    leiden, kmeans = box.obs["leiden"].astype(str).to_numpy(), box.obs["kmeans"].astype(str).to_numpy()
    assert box.n_obs == 1500
    assert adjusted_rand_score(truth, leiden) > 0.85  # 0.93 measured
    assert adjusted_rand_score(truth, kmeans) > 0.85  # 0.94 measured
    assert list(data.glob("a.zarr.run-*.md")), "no run summary beside the store"

    emb, emb_ref = np.asarray(box.read("obsm/X_spectral")), np.asarray(ref.read("obsm/X_spectral"))
    _say(request, f"X_spectral: container vs host, max |diff| {np.abs(emb - emb_ref).max():.3g}")
    # the same wheels on the same CPU; the tolerance is the one for any number of workers
    np.testing.assert_allclose(emb, emb_ref, rtol=1e-5, atol=1e-6)
    assert (leiden == ref.obs["leiden"].astype(str).to_numpy()).all()
    assert (kmeans == ref.obs["kmeans"].astype(str).to_numpy()).all()


def test_image_user_labels_and_commands(podman, request):
    """The image runs as uid 1000 with a writable HOME, carries the OCI labels and its pinned
    packages, and puts `dask scheduler`, `dask worker` and `torchrun` (what the Kubernetes
    manifests run, overriding the entrypoint) on PATH; 2 ranks under torchrun all-reduce; and
    `scatac-dist deploy k8s` finds the manifests it ships."""
    r = podman("image", "inspect", IMAGE)
    assert r.returncode == 0, r.stderr
    image = json.loads(r.stdout)[0]
    config, labels, size = image["Config"], image["Labels"], image["Size"]
    _say(request, f"{IMAGE}: {size} bytes ({size / 1e9:.2f} GB)")
    assert labels["org.opencontainers.image.title"] == "scatac-dist"
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.description"]
    assert config["User"] == "1000:1000" and config["WorkingDir"] == "/data"
    assert config["Entrypoint"] == ["scatac-dist"] and config["Cmd"] == ["--help"]
    assert "PYTHONUNBUFFERED=1" in config["Env"]

    script = """set -e
id -u; id -un; pwd
for c in scatac-dist dask torchrun python; do command -v $c; done
dask scheduler --help >/dev/null; dask worker --help >/dev/null; torchrun --help >/dev/null
torchrun --standalone --nproc_per_node=1 /usr/local/bin/scatac-dist --version 2>/dev/null
touch "$HOME/w" "$MPLCONFIGDIR/w" && echo home-writable
touch /opt/scatac-dist/w 2>/dev/null && echo venv-writable || echo venv-read-only
printf 'import torch, torch.distributed as d\nd.init_process_group("gloo")\nt = torch.ones(1) * (d.get_rank() + 1)\nd.all_reduce(t)\nif d.get_rank() == 0: print("all_reduce", int(t.item()))\nd.destroy_process_group()\n' >/tmp/ddp.py
torchrun --standalone --nproc_per_node=2 /tmp/ddp.py 2>/dev/null
site=$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
for p in torch/include torch/test pandas/tests scipy/stats/tests; do test ! -e "$site/$p" || echo "left: $p"; done
scatac-dist deploy k8s --image registry.example.org/scatac-dist:0.1.0 --store /data/a.zarr -o /tmp/k >/dev/null
echo deploy-k8s $(ls /tmp/k/scatac-dist/overlays)
python -m pip list --format json --disable-pip-version-check
"""
    t0 = time.monotonic()
    r = podman(*RUN, "--entrypoint", "sh", IMAGE, "-c", script)
    _say(request, f"podman run of the user, PATH, torchrun and pip checks: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[:3] == ["1000", "scatac", "/data"]
    assert lines[3:7] == [f"/opt/scatac-dist/bin/{c}" for c in ("scatac-dist", "dask", "torchrun", "python")]
    assert lines[7] == f"scatac-dist, version {VERSION}"  # torchrun SCRIPT, as deploy/k8s runs it
    assert lines[8:10] == ["home-writable", "venv-read-only"]
    assert lines[10] == "all_reduce 3"  # 1 + 2: 2 gloo ranks under torchrun, on loopback
    assert not [line for line in lines if line.startswith("left: ")]
    assert "deploy-k8s pipeline" in lines  # the manifests of deploy/k8s are in the wheel
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(lines[-1])}
    assert installed.get("scatac-dist") == VERSION
    pins = dict(line.split("==") for line in (REPO / "deploy" / "docker" / "requirements.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    wrong = {n: (v, installed.get(n.lower().replace("_", "-"))) for n, v in pins.items()
             if installed.get(n.lower().replace("_", "-"), "").split("+")[0] != v}
    assert not wrong, f"installed versions differ from deploy/docker/requirements.txt: {wrong}"
