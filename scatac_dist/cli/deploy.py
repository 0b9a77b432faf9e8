"""``scatac-dist deploy k8s``: a ready kustomization of deploy/k8s for a user's values
(:func:`scatac_dist.cluster.manifests.write_kustomization`)."""

from __future__ import annotations

from pathlib import Path

import click

from .context import Group

__all__ = ["deploy"]


@click.group("deploy", cls=Group)
def deploy():
    """Write what a cluster needs to run scatac-dist: Kubernetes manifests."""


@deploy.command("k8s", context_settings={"max_content_width": 100})
@click.option("--overlay", type=click.Choice(["pipeline", "interactive", "train-gpu", "train-gpu-pytorchjob"]),
              default="pipeline", show_default=True,
              help="pipeline: `scatac-dist run STORE` as a DaskJob; interactive: a DaskCluster for notebooks; "
                   "train-gpu: SCALE on GPU nodes (Indexed Job + headless Service); train-gpu-pytorchjob: the same "
                   "as a Kubeflow PyTorchJob.")
@click.option("--image", required=True, metavar="REGISTRY/NAME:TAG",
              help="The scatac-dist image the pods run (deploy/docker), with its version tag or digest.")
@click.option("--store", metavar="/data/NAME.zarr", help="The store, as the pods see it on the shared volume.")
@click.option("--namespace", help="Namespace of every resource (default: kubectl's current one).")
@click.option("--workers", type=int, help="pipeline/interactive: worker pods (default 4 / 2).")
@click.option("--adapt", metavar="MIN:MAX", help="pipeline/interactive: add a DaskAutoscaler between MIN and MAX workers.")
@click.option("--worker-cpu", metavar="QUANTITY", help="CPU request of each worker pod (default 1).")
@click.option("--worker-memory", metavar="QUANTITY", help="Memory request and limit of each worker pod (default 4Gi).")
@click.option("--nodes", type=int, help="train-gpu, train-gpu-pytorchjob: pods (nodes) that train together (default 2).")
@click.option("--gpus-per-node", type=int, help="train-gpu, train-gpu-pytorchjob: GPUs each pod requests, one rank each (default 4).")
@click.option("--storage-class", help="StorageClass of the volume of stores (ReadWriteMany).")
@click.option("--storage-size", metavar="QUANTITY", help="Size of the volume of stores (default 500Gi).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (default: ./k8s-OVERLAY).")
@click.option("--force", is_flag=True, help="Replace the folder if it exists.")
@click.argument("extra_args", nargs=-1, metavar="[-- OPTIONS OF THE COMMAND...]")
def k8s(overlay, image, store, namespace, workers, adapt, worker_cpu, worker_memory, nodes, gpus_per_node,
        storage_class, storage_size, output, force, extra_args):
    """Write a kustomization of deploy/k8s for these values; apply it with `kubectl apply -k`.

    Options after `--` are appended to the pods' scatac-dist command, e.g.
    `scatac-dist deploy k8s --overlay train-gpu --image ... --store /data/a.zarr -- --n-clusters 30`.
    """
    from ..cluster.manifests import OVERLAYS, DeployValues, write_kustomization

    values = DeployValues(overlay=overlay, image=image, store=store, namespace=namespace, workers=workers,
                          adapt=adapt, worker_cpu=worker_cpu, worker_memory=worker_memory, nodes=nodes,
                          gpus_per_node=gpus_per_node, storage_class=storage_class, storage_size=storage_size,
                          extra_args=list(extra_args))
    if extra_args and overlay == "interactive":
        raise click.UsageError("the interactive overlay runs no scatac-dist command: drop the options after --.")
    out = write_kustomization(values, output or Path(f"k8s-{overlay}"), force=force)
    click.echo(f"wrote {out}/kustomization.yaml ({OVERLAYS[overlay][0]})")
    click.echo(f"  check:  kubectl kustomize {out}")
    click.echo(f"  run:    kubectl apply -k {out}")
    if overlay in ("pipeline", "interactive"):
        name = "scatac-pipeline" if overlay == "pipeline" else "scatac-interactive"
        click.echo(f"  watch:  kubectl port-forward svc/{name}-scheduler 8787:8787  then open "
                   "http://127.0.0.1:8787/status")
