"""``scatac-dist deploy k8s``: a ready kustomization for one use of deploy/k8s, with a user's
values, instead of YAML to edit by hand.

:func:`write_kustomization` copies the base and the chosen overlay (shipped in the package, see
:data:`.kubernetes.MANIFESTS`) into a folder and writes, beside them, a ``kustomization.yaml``
that sets the image, the namespace, the store, the workers or GPUs and any extra options as
kustomize ``images`` and JSON patches. ``kubectl apply -k FOLDER`` then runs it; the folder
can be kept in a repository like any other kustomization.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from ..errors import ClusterError, OutputExistsError
from .jobqueue import parse_adapt
from .kubernetes import IMAGE_PLACEHOLDER, MANIFESTS, check_image

__all__ = ["OVERLAYS", "DeployValues", "write_kustomization", "render"]

#: overlay -> (what it is for, the resource file the values go into)
OVERLAYS = {
    "pipeline": ("the default pipeline as a DaskJob", "daskjob.yaml"),
    "interactive": ("a DaskCluster for notebooks", "daskcluster.yaml"),
    "train-gpu": ("SCALE on GPU nodes: an Indexed Job and a headless Service", "job.yaml"),
    "train-gpu-pytorchjob": ("SCALE on GPU nodes: a Kubeflow PyTorchJob", "pytorchjob.yaml"),
}
_MOUNT = PurePosixPath("/data")
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


@dataclass
class DeployValues:
    """A user's values for one overlay (``None``: keep the manifest's)."""

    overlay: str
    image: str
    store: str | None = None
    namespace: str | None = None
    workers: int | None = None
    adapt: str | None = None
    worker_cpu: str | None = None
    worker_memory: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    storage_class: str | None = None
    storage_size: str | None = None
    extra_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Refuse values the cluster would accept but the run could not use."""
        if self.overlay not in OVERLAYS:
            raise ClusterError(f"overlay {self.overlay!r} does not exist. Fix: use one of {', '.join(OVERLAYS)}.")
        check_image(self.image)
        dask = self.overlay in ("pipeline", "interactive")
        train = not dask
        if self.overlay != "interactive":
            if not self.store:
                raise ClusterError(f"the {self.overlay} overlay needs the store it works on. Fix: add --store "
                                   f"{_MOUNT}/NAME.zarr (its path on the shared volume, as the pods see it).")
            p = PurePosixPath(self.store)
            if not p.is_absolute() or _MOUNT not in p.parents:
                raise ClusterError(f"--store {self.store!r} is not on the shared volume: the pods see it at "
                                   f"{_MOUNT}. Fix: copy or ingest the store onto the volume and give its path "
                                   f"there, e.g. --store {_MOUNT}/{p.name or 'atlas.zarr'}.")
        elif self.store:
            raise ClusterError("the interactive overlay starts a cluster and runs nothing, so it takes no --store. "
                               "Fix: drop --store, or use --overlay pipeline.")
        for name, value, ok in (("--workers", self.workers, dask), ("--adapt", self.adapt, dask),
                                ("--worker-cpu", self.worker_cpu, dask), ("--worker-memory", self.worker_memory, dask),
                                ("--nodes", self.nodes, train), ("--gpus-per-node", self.gpus_per_node, train)):
            if value is not None and not ok:
                raise ClusterError(f"{name} does not apply to the {self.overlay} overlay. Fix: drop it "
                                   f"({'--workers/--adapt/--worker-*' if train else '--nodes/--gpus-per-node'} "
                                   "size this overlay).")
        if self.workers is not None and self.workers < 1:
            raise ClusterError(f"--workers {self.workers}: a Dask cluster needs at least one worker. Fix: --workers 1 "
                               "or more (or --adapt MIN:MAX).")
        parse_adapt(self.adapt)
        if self.nodes is not None and self.nodes < 1:
            raise ClusterError(f"--nodes {self.nodes}: training needs at least one node. Fix: --nodes 1 or more.")
        if train and self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise ClusterError(f"--gpus-per-node {self.gpus_per_node}: the {self.overlay} overlay trains one rank per "
                               "GPU and must request GPUs (nvidia.com/gpu). Fix: --gpus-per-node 1 or more; to "
                               "train on CPU nodes run `scatac-dist scale --nproc N` in an ordinary Job.")
        for name, q in (("--worker-cpu", self.worker_cpu), ("--worker-memory", self.worker_memory),
                        ("--storage-size", self.storage_size)):
            if q is not None and not _QUANTITY.match(str(q)):
                raise ClusterError(f"{name} {q!r} is not a Kubernetes quantity. Fix: e.g. 2, 500m, 8Gi.")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the patches) as literal blocks, as one writes them by hand."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _dump(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _env_index(container: dict, name: str) -> int:
    for i, e in enumerate(container.get("env", [])):
        if e["name"] == name:
            return i
    raise KeyError(name)


def _container_ops(prefix: str, c: dict, v: DeployValues, gpus: int | None) -> list[dict]:
    ops = []
    if v.store and "SCATAC_DIST_STORE" in {e["name"] for e in c.get("env", [])}:
        ops.append({"op": "replace", "path": f"{prefix}/env/{_env_index(c, 'SCATAC_DIST_STORE')}/value",
                    "value": v.store})
    if gpus is not None:
        if "GPUS_PER_NODE" in {e["name"] for e in c.get("env", [])}:
            ops.append({"op": "replace", "path": f"{prefix}/env/{_env_index(c, 'GPUS_PER_NODE')}/value",
                        "value": str(gpus)})
        for kind in ("requests", "limits"):
            ops.append({"op": "replace", "path": f"{prefix}/resources/{kind}/nvidia.com~1gpu", "value": gpus})
    for a in v.extra_args:
        ops.append({"op": "add", "path": f"{prefix}/args/-", "value": a})
    return ops


def _patches(v: DeployValues, resource: dict) -> list[dict]:
    """JSON patches (RFC 6902) of the overlay's main resource for ``v``."""
    ops: list[dict] = []
    if v.overlay == "pipeline":
        job = resource["spec"]["job"]["spec"]["containers"][0]
        ops += _container_ops("/spec/job/spec/containers/0", job, v, None)
        worker_prefix = "/spec/cluster/spec/worker"
    elif v.overlay == "interactive":
        worker_prefix = "/spec/worker"
    elif v.overlay == "train-gpu":
        c = resource["spec"]["template"]["spec"]["containers"][0]
        if v.nodes is not None:
            ops += [{"op": "replace", "path": f"/spec/{k}", "value": v.nodes} for k in ("completions", "parallelism")]
            ops.append({"op": "replace", "path": f"/spec/template/spec/containers/0/env/{_env_index(c, 'NNODES')}/value",
                        "value": str(v.nodes)})
        ops += _container_ops("/spec/template/spec/containers/0", c, v, v.gpus_per_node)
        worker_prefix = None
    else:  # train-gpu-pytorchjob
        if v.gpus_per_node is not None:
            ops.append({"op": "replace", "path": "/spec/nprocPerNode", "value": str(v.gpus_per_node)})
        if v.nodes is not None:
            if v.nodes == 1:
                ops.append({"op": "remove", "path": "/spec/pytorchReplicaSpecs/Worker"})
            else:
                ops.append({"op": "replace", "path": "/spec/pytorchReplicaSpecs/Worker/replicas", "value": v.nodes - 1})
        for role in ("Master", "Worker"):
            if role == "Worker" and v.nodes == 1:
                continue
            prefix = f"/spec/pytorchReplicaSpecs/{role}/template/spec/containers/0"
            c = resource["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]
            ops += _container_ops(prefix, c, v, v.gpus_per_node)
        worker_prefix = None
    if worker_prefix:
        if v.workers is not None:
            ops.append({"op": "replace", "path": f"{worker_prefix}/replicas", "value": v.workers})
        res = f"{worker_prefix}/spec/containers/0/resources"
        if v.worker_cpu is not None:
            ops.append({"op": "replace", "path": f"{res}/requests/cpu", "value": str(v.worker_cpu)})
        if v.worker_memory is not None:
            ops += [{"op": "replace", "path": f"{res}/{k}/memory", "value": str(v.worker_memory)}
                    for k in ("requests", "limits")]
    return ops


def _kustomization(v: DeployValues, resource: dict, name: str, kind: str, group: str, version: str) -> dict:
    img_name, tag, digest = check_image(v.image)
    image = {"name": IMAGE_PLACEHOLDER, "newName": img_name}
    if digest:
        image["digest"] = digest
    else:
        image["newTag"] = tag
    k: dict = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    if v.namespace:
        k["namespace"] = v.namespace
    k["resources"] = [f"scatac-dist/overlays/{v.overlay}"]
    if v.adapt:
        k["resources"].append("daskautoscaler.yaml")
    k["images"] = [image]
    patches = []
    ops = _patches(v, resource)
    if ops:
        patches.append({"target": {"group": group, "version": version, "kind": kind, "name": name},
                        "patch": _dump(ops)})
    pvc_ops = []
    if v.storage_class:
        pvc_ops.append({"op": "add", "path": "/spec/storageClassName", "value": v.storage_class})
    if v.storage_size:
        pvc_ops.append({"op": "replace", "path": "/spec/resources/requests/storage", "value": str(v.storage_size)})
    if pvc_ops:
        patches.append({"target": {"version": "v1", "kind": "PersistentVolumeClaim", "name": "scatac-dist-data"},
                        "patch": _dump(pvc_ops)})
    if patches:
        k["patches"] = patches
    return k


def render(folder: str | os.PathLike) -> str:
    """``kubectl kustomize FOLDER``: the manifests ``kubectl apply -k`` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ClusterError("kubectl is not on PATH. Fix: install kubectl (it renders kustomizations offline).")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True)
    if done.returncode:
        raise ClusterError(f"kubectl kustomize {folder} failed: {done.stderr.strip()}")
    return done.stdout


def write_kustomization(values: DeployValues, output: str | os.PathLike, *, force: bool = False,
                        check_render: bool = True) -> Path:
    """Write the kustomization of ``values`` into the folder ``output`` (created whole or not at
    all; an existing one is replaced only with ``force``) and return it. With ``check_render``
    and kubectl on PATH, the folder is rendered before it is put in place."""
    values.check()
    out = Path(output)
    if out.exists() and not force:
        raise OutputExistsError(out, "the folder exists", "choose another --output, or add --force to replace it")
    main_file = OVERLAYS[values.overlay][1]
    resource = _load(MANIFESTS / "overlays" / values.overlay / main_file)
    api, version = resource["apiVersion"].rsplit("/", 1) if "/" in resource["apiVersion"] else ("", resource["apiVersion"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(MANIFESTS / "base", tmp / "scatac-dist" / "base")
        shutil.copytree(MANIFESTS / "overlays" / values.overlay, tmp / "scatac-dist" / "overlays" / values.overlay)
        if values.adapt:
            lo, hi = parse_adapt(values.adapt)
            cluster = resource["metadata"]["name"]
            (tmp / "daskautoscaler.yaml").write_text(_dump({
                "apiVersion": "kubernetes.dask.org/v1", "kind": "DaskAutoscaler", "metadata": {"name": cluster},
                "spec": {"cluster": cluster, "minimum": lo, "maximum": hi}}))
        k = _kustomization(values, resource, resource["metadata"]["name"], resource["kind"], api, version)
        header = (f"# {OVERLAYS[values.overlay][0]}, written by `scatac-dist deploy k8s`.\n"
                  f"#   kubectl apply -k {out}\n# scatac-dist/ holds a copy of deploy/k8s (base and overlay).\n")
        (tmp / "kustomization.yaml").write_text(header + _dump(k))
        if check_render and shutil.which("kubectl"):
            render(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
