"""Dask workers as Kubernetes pods: ``--cluster k8s``.

:func:`make_kube_cluster` creates a ``DaskCluster`` through the dask-kubernetes operator
(``dask_kubernetes.operator.KubeCluster``) and returns the cluster; the operator starts the
scheduler and the worker pods, and deletes them when the cluster is closed. The cluster's
pods are those of ``deploy/k8s/overlays/interactive`` (:func:`cluster_spec` reads that
manifest, shipped in the package), with the image, the number of workers, their resources,
the volume of stores and the namespace taken from ``scatac-dist.cluster.kubernetes``.

The client must see the stores at the path the workers see them (``mount-path``, ``/data``):
run it in a pod that mounts the same ReadWriteMany volume. A pipeline run as a batch job is
simpler as a ``DaskJob`` (``deploy/k8s/overlays/pipeline``): its job pod connects to the
operator's scheduler through ``DASK_SCHEDULER_ADDRESS``, which :func:`get_client` follows
without any flag.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path

import yaml

from .. import _config
from ..errors import ClusterError

logger = logging.getLogger("scatac_dist")

__all__ = ["MANIFESTS", "cluster_spec", "find_kube_config", "make_kube_cluster", "check_image"]

#: The kustomize base and overlays of deploy/k8s (a link in the source tree, files in a wheel).
MANIFESTS = Path(__file__).resolve().parent / "k8s"
#: The name every container of the manifests gives its image, mapped by kustomize's ``images``.
IMAGE_PLACEHOLDER = "scatac-dist"

_IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
_TAG = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


def check_image(image: str | None) -> tuple[str, str | None, str | None]:
    """Split ``image`` into name, tag and digest; refuse one without a tag or digest, or tagged
    ``latest`` (a pod restarted later could run another version than its peers)."""
    if not image:
        raise ClusterError("no container image is set for Kubernetes. Fix: build and push the image "
                           "(deploy/docker/README.md) and pass --image REGISTRY/scatac-dist:TAG (or set "
                           "scatac-dist.cluster.kubernetes.image).")
    # a colon in the last path part is a tag; one before a slash is a registry port
    m = _TAG.match(image.strip())
    if not m:
        raise ClusterError(f"{image!r} is not an image reference. Fix: give REGISTRY/NAME:TAG, "
                           "e.g. registry.example.org/lab/scatac-dist:0.1.0.")
    name, tag, digest = m.group("name"), m.group("tag"), m.group("digest")
    if not tag and not digest:
        raise ClusterError(f"the image {image!r} has no tag. Fix: name the version you built, e.g. "
                           f"{image}:0.1.0 (or pin a digest, {image}@sha256:...); without one Kubernetes pulls "
                           "`latest`, and pods started at different times may run different code.")
    if tag == "latest":
        raise ClusterError(f"the image {image!r} is tagged `latest`. Fix: tag the image with its version "
                           "(e.g. :0.1.0) so that every pod of a run runs the same code.")
    return name, tag, digest


def find_kube_config() -> str:
    """Where the Kubernetes credentials come from (a kube config file, or the pod's service
    account); raises :class:`ClusterError` when there are none."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and _IN_CLUSTER_TOKEN.is_file():
        return "the pod's service account"
    env = os.environ.get("KUBECONFIG")
    paths = [p for p in env.split(os.pathsep) if p] if env else [str(Path.home() / ".kube" / "config")]
    found = [p for p in paths if Path(p).is_file()]
    if found:
        return ", ".join(found)
    where = f"KUBECONFIG={env}" if env else f"{paths[0]} (KUBECONFIG is not set)"
    raise ClusterError(
        f"no Kubernetes configuration found: {where} does not exist and this is not a pod with a service "
        "account token. Fix: point KUBECONFIG at your cluster's kube config (`kubectl config view` should "
        "show it), run inside the cluster with a service account allowed to create DaskClusters, or run the "
        "pipeline as a DaskJob (scatac-dist deploy k8s --overlay pipeline).")


def _options(overrides: dict) -> dict:
    opts = dict(_config.get("cluster.kubernetes") or {})
    opts.update({k.replace("_", "-"): v for k, v in overrides.items() if v is not None})
    return opts


def cluster_spec(name: str = "scatac-dist", **overrides) -> dict:
    """The ``DaskCluster`` resource ``--cluster k8s`` creates: the pods of the interactive
    overlay with ``image``, ``workers``, ``worker-cpu``, ``worker-memory``, ``pvc``,
    ``mount-path``, ``config-map``, ``service-account`` and ``idle-timeout`` from
    ``scatac-dist.cluster.kubernetes`` (keyword arguments, ``_`` for ``-``, override them)."""
    opts = _options(overrides)
    check_image(opts.get("image"))
    template = yaml.safe_load((MANIFESTS / "overlays" / "interactive" / "daskcluster.yaml").read_text())
    spec = copy.deepcopy(template)
    spec["metadata"] = {"name": name}
    spec["spec"]["idleTimeout"] = int(opts.get("idle-timeout") or 0)
    worker = spec["spec"]["worker"]
    worker["replicas"] = int(opts.get("workers") or 1)
    service = spec["spec"]["scheduler"]["service"]
    service["selector"]["dask.org/cluster-name"] = name
    service["type"] = opts.get("scheduler-service-type") or "ClusterIP"
    mount = str(opts.get("mount-path") or "/data")
    for pod in (worker["spec"], spec["spec"]["scheduler"]["spec"]):
        sa = opts.get("service-account")
        if sa:
            pod["serviceAccountName"] = sa
        else:
            pod.pop("serviceAccountName", None)
        volumes = []
        for v in pod.get("volumes", []):
            if "persistentVolumeClaim" in v:
                v["persistentVolumeClaim"]["claimName"] = opts.get("pvc") or "scatac-dist-data"
            if "configMap" in v and not opts.get("config-map"):
                continue
            if "configMap" in v:
                v["configMap"]["name"] = opts["config-map"]
            volumes.append(v)
        pod["volumes"] = volumes
        names = {v["name"] for v in volumes}
        for c in pod["containers"]:
            c["image"] = opts["image"]
            c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] in names]
            for m in c["volumeMounts"]:
                if m["name"] == "data":
                    m["mountPath"] = mount
    res = worker["spec"]["containers"][0]["resources"]
    if opts.get("worker-cpu"):
        res["requests"]["cpu"] = str(opts["worker-cpu"])
    if opts.get("worker-memory"):
        res["requests"]["memory"] = res["limits"]["memory"] = str(opts["worker-memory"])
    return spec


def _kube_cluster_class():
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:
        raise ClusterError("--cluster k8s needs dask-kubernetes. Fix: pip install \"scatac-dist[k8s]\" "
                           f"({exc}).") from exc
    return KubeCluster


def make_kube_cluster(n_workers: int | None = None, adapt: tuple[int, int] | None = None, **overrides):
    """Create the ``DaskCluster`` of :func:`cluster_spec` through the operator and return the
    ``KubeCluster``; closing it deletes the cluster and its pods."""
    opts = _options({**overrides, "workers": n_workers})
    spec = cluster_spec(**{k.replace("-", "_"): v for k, v in opts.items()})
    source = find_kube_config()
    cls = _kube_cluster_class()
    namespace = opts.get("namespace")
    logger.info("Kubernetes (credentials: %s): creating DaskCluster %s with %d worker pods of %s",
                source, spec["metadata"]["name"], spec["spec"]["worker"]["replicas"], opts["image"])
    try:
        cluster = cls(custom_cluster_spec=spec, namespace=namespace, shutdown_on_close=True,
                      resource_timeout=int(opts.get("resource-timeout") or 300), quiet=True)
    except ClusterError:
        raise
    except Exception as exc:  # the operator's and kr8s's errors: API refused, operator missing, timeout
        raise ClusterError(
            f"could not create the DaskCluster in namespace {namespace or '(the kube config default)'}: {exc}. "
            "Fix: check that the dask-kubernetes operator is installed (kubectl get crd daskclusters."
            "kubernetes.dask.org), that your account may create DaskClusters there, and that the image "
            f"{opts['image']} can be pulled by the nodes.") from exc
    if adapt:
        cluster.adapt(minimum=adapt[0], maximum=adapt[1])
        logger.info("Kubernetes: adaptive, %d to %d worker pods", adapt[0], adapt[1])
    return cluster
