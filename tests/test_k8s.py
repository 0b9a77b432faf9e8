"""Kubernetes: the manifests of deploy/k8s, `scatac-dist deploy k8s` and `--cluster k8s`.

No Kubernetes API server can run here. What is real: `kubectl kustomize` renders every overlay,
the Kubernetes 1.37 schemas (kubernetes-validate, strict) and the dask-kubernetes operator's
CRD schemas check them (tests/k8s.py), and the pods' own command lines run as local processes.
Those last tests stand in for the operator and the kubelet: they inject what the operator
injects (DASK_SCHEDULER_ADDRESS, DASK_WORKER_NAME) and what the Job controller sets
(JOB_COMPLETION_INDEX), expand `$(VAR)` as the kubelet does, map the volumes' mount paths to
temporary folders and the pods' ports to free ports on loopback (in a cluster each pod has
its own network namespace). For `--cluster k8s` only the call that would reach an API server
(creating the KubeCluster) is replaced, and the test says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from scatac_dist import open_atlas
from scatac_dist.cli import main
from scatac_dist.cluster import close_client, get_client
from scatac_dist.cluster import kubernetes as kube
from scatac_dist.errors import ClusterError

from . import k8s

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
BIN = Path(sys.executable).parent
CLI = str(BIN / "scatac-dist")
IMAGE = "registry.example.org/lab/scatac-dist:0.1.0"

# kubectl (with kustomize) is on the machine image (GUIDE §4): without it these tests fail, not skip


def _deploy(tmp_path, *args) -> list[dict]:
    out = tmp_path / "k"
    r = CliRunner().invoke(main, ["deploy", "k8s", "--image", IMAGE, "-o", str(out), *args])
    assert r.exit_code == 0, r.output
    return k8s.render(out)


def _one(docs, kind):
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# -- the manifests ----------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", sorted(p.name for p in OVERLAYS.iterdir()))
def test_every_overlay_renders_and_validates_strictly(overlay):
    docs = k8s.render(OVERLAYS / overlay)
    kinds = {d["kind"] for d in docs}
    assert {"ServiceAccount", "PersistentVolumeClaim", "ConfigMap"} <= kinds  # the base
    for doc in docs:
        k8s.validate(doc)
    for c in (c for d in docs for c in k8s.containers(d)):
        assert c["image"] == "scatac-dist:0.1.0"  # the base's image setting reached every container
    pvc = _one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    config = yaml.safe_load(_one(docs, "ConfigMap")["data"]["scatac_dist.yaml"])
    assert "scatac-dist" in config and "distributed" in config


def test_the_interactive_cluster_has_the_pipelines_pods():
    """The DaskCluster (also what --cluster k8s creates) and the DaskJob's cluster are written
    out twice, as kustomize cannot share a pod spec between two custom resources: they must
    not drift apart."""
    job = _one(k8s.render(OVERLAYS / "pipeline"), "DaskJob")["spec"]["cluster"]["spec"]
    interactive = _one(k8s.render(OVERLAYS / "interactive"), "DaskCluster")["spec"]
    assert interactive["worker"]["spec"] == job["worker"]["spec"]
    assert interactive["scheduler"]["spec"] == job["scheduler"]["spec"]
    assert interactive["scheduler"]["service"]["ports"] == job["scheduler"]["service"]["ports"]


def test_the_checks_fail_on_broken_manifests():
    """The same validation refuses what an API server would: so a pass above means something."""
    docs = k8s.render(OVERLAYS / "pipeline-adaptive")
    job, scaler, pvc = _one(docs, "DaskJob"), _one(docs, "DaskAutoscaler"), _one(docs, "PersistentVolumeClaim")

    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["cluster"]["spec"]["worker"]["replica"] = 2  # misspelt
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        k8s.validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["job"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = ["4Gi"]
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        k8s.validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(scaler))
    del bad["spec"]["maximum"]
    with pytest.raises(jsonschema.ValidationError, match="maximum"):
        k8s.validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(pvc))
    bad["spec"]["accessMode"] = ["ReadWriteMany"]
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s.validate(bad)
    train = _one(k8s.render(OVERLAYS / "train-gpu"), "Job")
    train["spec"]["template"]["spec"]["containers"][0]["env"][1]["value"] = 7  # env values are strings
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s.validate(train)
    torchjob = _one(k8s.render(OVERLAYS / "train-gpu-pytorchjob"), "PyTorchJob")
    torchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["port"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s.validate(torchjob)


def test_training_job_meets_at_pod_zero_of_its_headless_service():
    docs = k8s.render(OVERLAYS / "train-gpu")
    job, svc = _one(docs, "Job"), _one(docs, "Service")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == int(env["NNODES"])
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert f"--rdzv-endpoint={job['metadata']['name']}-0.{svc['metadata']['name']}:29400" in c["args"]
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in c["args"] and "--resume=auto" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == int(env["GPUS_PER_NODE"])
    assert pod["tolerations"] and pod["nodeSelector"] and env["SCATAC_DIST_DEVICE"] == "cuda"


# -- scatac-dist deploy k8s -------------------------------------------------------------------

def test_deploy_k8s_writes_a_kustomization_with_the_values(tmp_path):
    docs = _deploy(tmp_path, "--store", "/data/mouse.zarr", "--workers", "7", "--adapt", "2:20",
                   "--worker-memory", "16Gi", "--worker-cpu", "2", "--namespace", "atlas", "--storage-class", "nfs",
                   "--storage-size", "2Ti")
    for doc in docs:
        k8s.validate(doc)
        assert doc["metadata"]["namespace"] == "atlas"
    job = _one(docs, "DaskJob")
    assert all(c["image"] == IMAGE for c in k8s.containers(job))
    worker = job["spec"]["cluster"]["spec"]["worker"]
    assert worker["replicas"] == 7
    assert worker["spec"]["containers"][0]["resources"] == {"requests": {"cpu": "2", "memory": "16Gi"},
                                                            "limits": {"memory": "16Gi"}}
    runner = job["spec"]["job"]["spec"]["containers"][0]
    assert {"name": "SCATAC_DIST_STORE", "value": "/data/mouse.zarr"} in runner["env"]
    scaler = _one(docs, "DaskAutoscaler")["spec"]
    assert scaler == {"cluster": "scatac-pipeline", "minimum": 2, "maximum": 20}
    pvc = _one(docs, "PersistentVolumeClaim")["spec"]
    assert pvc["storageClassName"] == "nfs" and pvc["resources"]["requests"]["storage"] == "2Ti"


@pytest.mark.parametrize("overlay", ["train-gpu", "train-gpu-pytorchjob"])
def test_deploy_k8s_sizes_the_training_by_nodes_and_gpus(tmp_path, overlay):
    docs = _deploy(tmp_path, "--overlay", overlay, "--store", "/data/a.zarr", "--nodes", "3", "--gpus-per-node", "8",
                   "--", "--n-clusters", "30")
    for doc in docs:
        k8s.validate(doc)
    if overlay == "train-gpu":
        job = _one(docs, "Job")
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
        pods = [job["spec"]["template"]]
        env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
        assert env["NNODES"] == "3" and env["GPUS_PER_NODE"] == "8"
    else:
        spec = _one(docs, "PyTorchJob")["spec"]
        assert spec["nprocPerNode"] == "8" and spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
        pods = [r["template"] for r in spec["pytorchReplicaSpecs"].values()]
    for pod in pods:
        c = pod["spec"]["containers"][0]
        assert c["image"] == IMAGE and c["args"][-2:] == ["--n-clusters", "30"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert {"name": "SCATAC_DIST_STORE", "value": "/data/a.zarr"} in c["env"]


@pytest.mark.parametrize("args, message", [
    (["--store", "/data/a.zarr", "--image", "reg.example.org/scatac-dist"], "has no tag"),
    (["--store", "/data/a.zarr", "--image", "reg.example.org:5000/scatac-dist:latest"], "tagged `latest`"),
    (["--image", IMAGE], "needs the store"),
    (["--image", IMAGE, "--store", "atlas.zarr"], "not on the shared volume"),
    (["--image", IMAGE, "--store", "/data/a.zarr", "--nodes", "2"], "does not apply"),
    (["--image", IMAGE, "--overlay", "train-gpu", "--store", "/data/a.zarr", "--gpus-per-node", "0"],
     "must request GPUs"),
    (["--image", IMAGE, "--overlay", "interactive", "--store", "/data/a.zarr"], "takes no --store"),
    (["--image", IMAGE, "--store", "/data/a.zarr", "--worker-memory", "lots"], "not a Kubernetes quantity"),
    (["--image", IMAGE, "--store", "/data/a.zarr", "--adapt", "9:2"], "MIN:MAX"),
])
def test_deploy_k8s_refuses_bad_values_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "k"
    r = CliRunner().invoke(main, ["deploy", "k8s", "-o", str(out), *args])
    assert r.exit_code == 2 and message in r.output and "Fix:" in r.output, r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_deploy_k8s_keeps_an_existing_folder_unless_forced(tmp_path):
    out = tmp_path / "k"
    out.mkdir()
    (out / "mine.yaml").write_text("kind: Mine\n")
    args = ["deploy", "k8s", "--image", IMAGE, "--store", "/data/a.zarr", "-o", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--force" in r.output and (out / "mine.yaml").is_file()
    r = CliRunner().invoke(main, [*args, "--force"])
    assert r.exit_code == 0 and not (out / "mine.yaml").exists() and (out / "kustomization.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


# -- --cluster k8s ----------------------------------------------------------------------------

def test_k8s_cluster_spec_is_a_valid_daskcluster_with_the_config():
    spec = kube.cluster_spec(image=IMAGE, workers=5, worker_memory="12Gi", worker_cpu="3", pvc="atlases",
                             mount_path="/atlases", config_map="")
    k8s.validate(spec)
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 5
    c = worker["spec"]["containers"][0]
    assert c["image"] == IMAGE and c["resources"]["requests"] == {"cpu": "3", "memory": "12Gi"}
    assert {"name": "data", "mountPath": "/atlases"} in c["volumeMounts"]
    assert not any("configMap" in v for v in worker["spec"]["volumes"])
    assert worker["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "atlases"
    sched = spec["spec"]["scheduler"]
    assert sched["service"]["selector"]["dask.org/cluster-name"] == spec["metadata"]["name"]
    assert sched["spec"]["containers"][0]["command"] == ["dask", "scheduler"]


class _FakeKubeCluster:
    """Stands in for dask_kubernetes.operator.KubeCluster, the one call that needs an API server:
    it records what it is given and runs the 'pods' as a LocalCluster on loopback."""

    made: list = []

    def __new__(cls, **kwargs):
        from distributed import LocalCluster

        n = kwargs["custom_cluster_spec"]["spec"]["worker"]["replicas"]
        local = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                             dashboard_address=":0")
        local.kube_kwargs = kwargs
        cls.made.append(local)
        return local


def test_get_client_k8s_creates_the_cluster_from_the_config_and_closes_it(tmp_path, monkeypatch):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(kube, "_kube_cluster_class", lambda: _FakeKubeCluster)
    client = get_client(cluster="k8s", n_workers=2, image=IMAGE, namespace="atlas")
    try:
        assert len(client.scheduler_info()["workers"]) == 2
        assert client.submit(sum, [1, 2, 3]).result() == 6
    finally:
        close_client(client)
    (made,) = _FakeKubeCluster.made
    assert made.status.name == "closed"
    kwargs = made.kube_kwargs
    assert kwargs["namespace"] == "atlas" and kwargs["shutdown_on_close"] is True
    k8s.validate(kwargs["custom_cluster_spec"])
    assert kwargs["custom_cluster_spec"]["spec"]["worker"]["spec"]["containers"][0]["image"] == IMAGE


def test_dashboard_line_in_a_pod_is_a_port_forward(monkeypatch):
    from types import SimpleNamespace

    from scatac_dist.cluster import dashboard_hint

    client = SimpleNamespace(dashboard_link="http://10.4.2.7:8787/status", cluster=None,
                             scheduler=SimpleNamespace(address="tcp://scatac-pipeline-scheduler.atlas.svc.cluster.local:8786"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert "kubectl" not in dashboard_hint(client)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert "kubectl port-forward -n atlas svc/scatac-pipeline-scheduler 8787:8787" in dashboard_hint(client)


def test_cluster_k8s_without_kube_config_or_image_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    store = tmp_path / "a.zarr"
    r = CliRunner().invoke(main, ["--cluster", "k8s", "--image", IMAGE, "synth", "-o", str(store), "--cells", "50"])
    assert r.exit_code == 2 and "no Kubernetes configuration found" in r.output and "Fix:" in r.output, r.output
    assert not store.exists()
    with pytest.raises(ClusterError, match="no container image"):
        get_client(cluster="k8s")


# -- the pods' own commands, run here ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Pods:
    """Start containers' command lines as local processes, the way the kubelet would run them."""

    def __init__(self, tmp_path: Path, docs: list[dict]):
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        # the ConfigMap mounted at /etc/dask: written here, found through DASK_CONFIG
        self.config = tmp_path / "etc-dask"
        self.config.mkdir()
        for name, text in _one(docs, "ConfigMap")["data"].items():
            (self.config / name).write_text(text)
        self.mounts = {"/data": tmp_path / "data", "/scratch": tmp_path / "scratch"}
        for p in self.mounts.values():
            p.mkdir(exist_ok=True)

    def path(self, text: str) -> str:
        for mount, local in self.mounts.items():
            if text == mount or text.startswith(mount + "/"):
                return str(local) + text[len(mount):]
        return text

    def argv(self, c: dict, injected: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        env: dict[str, str] = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = self.path(k8s.expand(e["value"], env))
        env.update(injected)
        argv = [self.path(k8s.expand(a, env)) for a in c["command"] + c.get("args", [])]
        argv[0] = str(BIN / argv[0])  # the image's PATH holds the venv's commands, as this one does
        full = {**os.environ, **env, "DASK_CONFIG": str(self.config), "PATH": f"{BIN}:{os.environ['PATH']}"}
        return argv, full

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        p = subprocess.Popen(argv, env=env, stdout=(self.tmp / f"{name}.out").open("w"), stderr=log.open("w"),
                             start_new_session=True)
        self.procs.append(p)
        return p

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in self.logs)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _on_loopback(argv: list[str], ports: dict[str, int]) -> list[str]:
    """A pod's network namespace, here: bind to loopback and to free ports."""
    out = list(argv)
    for i, a in enumerate(argv[:-1]):
        if a == "--host":
            out[i + 1] = "127.0.0.1"
        elif a == "--port":
            out[i + 1] = str(ports["tcp-comm"])
        elif a == "--dashboard-address":
            out[i + 1] = f"127.0.0.1:{_free_port()}"
    return out


def _synth(path: Path):
    r = subprocess.run([CLI, "--workers", "2", "--no-progress", "synth", "-o", str(path), "--cells", "3000",
                        "--peaks", "4000", "--clusters", "5", "--chunk-rows", "1000", "--seed", "3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_daskjob_commands_run_the_pipeline_like_a_local_run(tmp_path, monkeypatch):
    """The rendered DaskJob's scheduler, worker and job containers, run here: the job pod's
    `scatac-dist run` finds the scheduler through DASK_SCHEDULER_ADDRESS alone (no flag), and
    the embedding and clusters equal those of a local run on another number of workers."""
    docs = _deploy(tmp_path, "--store", "/data/atlas.zarr", "--workers", "3")
    job = _one(docs, "DaskJob")
    # every process reads the store in 3 row chunks (a site's setting over the ConfigMap's)
    monkeypatch.setenv("DASK_SCATAC_DIST__STORE__CHUNK_ROWS", "1000")
    pods = _Pods(tmp_path, docs)
    _synth(pods.mounts["/data"] / "atlas.zarr")
    local = tmp_path / "local.zarr"
    shutil.copytree(pods.mounts["/data"] / "atlas.zarr", local)

    cluster = job["spec"]["cluster"]["spec"]
    ports = {"tcp-comm": _free_port()}
    address = f"tcp://127.0.0.1:{ports['tcp-comm']}"  # the operator injects the scheduler Service's name
    try:
        argv, env = pods.argv(cluster["scheduler"]["spec"]["containers"][0], {})
        pods.start("scheduler", _on_loopback(argv, ports), env)
        for i in range(cluster["worker"]["replicas"]):
            argv, env = pods.argv(cluster["worker"]["spec"]["containers"][0],
                                  {"DASK_SCHEDULER_ADDRESS": address,
                                   "DASK_WORKER_NAME": f"scatac-pipeline-default-worker-{i}"})
            pods.start(f"worker-{i}", _on_loopback(argv, ports), env)
        argv, env = pods.argv(job["spec"]["job"]["spec"]["containers"][0], {"DASK_SCHEDULER_ADDRESS": address})
        assert "--scheduler" not in argv and argv[-1] == str(pods.mounts["/data"] / "atlas.zarr")
        runner = pods.start("job", argv, env)
        assert runner.wait(timeout=900) == 0, pods.tail()
    finally:
        pods.stop()
    assert f"Connecting to the scheduler of Dask's config (DASK_SCHEDULER_ADDRESS): {address}" in pods.tail()
    assert "3 row chunks of 1000 cells" in (tmp_path / "job.out").read_text()

    r = subprocess.run([CLI, "--workers", "2", "--no-progress", "run", str(local)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = open_atlas(local), open_atlas(pods.mounts["/data"] / "atlas.zarr")
    np.testing.assert_allclose(np.asarray(b.read("obsm/X_spectral")), np.asarray(a.read("obsm/X_spectral")),
                               rtol=1e-5, atol=1e-6)
    assert (b.obs["leiden"].astype(str).to_numpy() == a.obs["leiden"].astype(str).to_numpy()).all()
    summary = list(b.runs().values())[-1]
    assert summary["status"] == "done" and len(summary["stages"][-1]["peak_memory_per_worker"]) == 3


def test_training_job_commands_train_scale_across_two_pods(tmp_path):
    """The rendered Indexed Job's torchrun line, run as pods 0 and 1 (JOB_COMPLETION_INDEX as
    the Job controller sets it), meeting at pod 0's rendezvous endpoint on loopback: gloo on
    CPU (no GPU here, so SCATAC_DIST_DEVICE=cpu and one rank per 'node'). Rank 0 writes
    obsm['X_scale']."""
    docs = _deploy(tmp_path, "--overlay", "train-gpu", "--store", "/data/atlas.zarr", "--nodes", "2",
                   "--gpus-per-node", "1", "--", "--max-iter", "300", "--min-iter", "0", "--n-clusters", "5",
                   "--checkpoint-every", "100")
    job = _one(docs, "Job")
    pods = _Pods(tmp_path, docs)
    store = pods.mounts["/data"] / "atlas.zarr"
    _synth(store)
    c = job["spec"]["template"]["spec"]["containers"][0]
    port = _free_port()
    endpoint = f"--rdzv-endpoint={job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}:29400"
    assert endpoint in c["args"]
    try:
        for index in range(job["spec"]["completions"]):
            argv, env = pods.argv(c, {"JOB_COMPLETION_INDEX": str(index), "SCATAC_DIST_DEVICE": "cpu"})
            argv = [f"--rdzv-endpoint=127.0.0.1:{port}" if a == endpoint else a for a in argv]
            pods.start(f"train-{index}", argv, env)
        for p in pods.procs:
            assert p.wait(timeout=900) == 0, pods.tail()
    finally:
        pods.stop()
    out = (tmp_path / "train-0.out").read_text()
    summary = json.loads(out[out.index("{"):])
    assert summary["world_size"] == 2 and summary["steps"] == 300, summary
    atlas = open_atlas(store)
    assert "X_scale" in atlas.keys("obsm")
    assert np.isfinite(np.asarray(atlas.read("obsm/X_scale"))[atlas.obs["scale_used"]]).all()
