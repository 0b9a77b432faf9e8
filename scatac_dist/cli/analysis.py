"""The default pipeline and what reads its results: ``run``, ``plot``, ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InputError
from .context import Session, bars_on_stderr, command, pass_session
from .defaults import option_from
from .describe import describe

__all__ = ["run", "plot", "evaluate"]

plot_option = option_from("scatac_dist.pl:umap")


@command("run")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--config", type=click.Path(exists=True, dir_okay=False),
              help="YAML mapping stage names to parameters, e.g. {lsi: {n_comps: 50}}.")
@click.option("--n-clusters", type=int, help="Search Leiden's resolution to K clusters and run k-means with K.")
@click.option("--mod", help="Modality of a MuData store (default atac).")
@click.option("--force", is_flag=True, help="Re-run stages already done with the same parameters.")
@pass_session
def run(session: Session, store, config, n_clusters, mod, force):
    """Run the default pipeline: QC, filter, feature selection, TF-IDF, LSI, spectral
    embedding, neighbours, Leiden (and k-means with --n-clusters), UMAP. Resumable."""
    import yaml

    from ..pipeline import default_stages, run_stages
    from ..store import open_atlas

    atlas = open_atlas(store, mod=mod)
    session.lock(atlas.path)
    if n_clusters is not None and not 1 <= n_clusters <= atlas.n_obs:
        raise InputError(atlas.path, f"--n-clusters {n_clusters} is more than its {atlas.n_obs} cells",
                         f"give --n-clusters between 1 and {atlas.n_obs}")
    try:
        overrides = yaml.safe_load(Path(config).read_text()) if config else {}
        stages = default_stages(n_clusters, overrides)
    except (ValueError, yaml.YAMLError) as exc:
        raise InputError(config, str(exc).rstrip("."), "edit the config: stage names and parameters are "
                         "listed in docs/methods/pipeline.md") from None
    if atlas.nnz == 0:
        raise InputError(atlas.path, "holds no counts (nnz = 0)", "ingest a non-empty matrix")
    client = session.client()
    with bars_on_stderr():
        report = run_stages(atlas, stages, client=client, force=force, progress=session.progress)
    click.echo(json.dumps(report, indent=1))
    click.echo(describe(store))


@command("plot", user_errors=(ValueError,))
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--color", required=True, help="obs column to colour by.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="PNG path (default STORE_umap_COLOR.png).")
@plot_option("--basis")
@click.option("--mod", help="Modality of a MuData store (default atac).")
def plot(store, color, output, basis, mod):
    """Write a UMAP (or any 2-D obsm) scatter PNG coloured by an obs column."""
    from .. import pl
    from ..store import open_atlas

    out = output or Path(f"{Path(store).with_suffix('')}_umap_{color.replace(' ', '_')}.png")
    png = pl.umap(open_atlas(store, mod=mod), out, color=color, basis=basis)
    click.echo(f"wrote {png}")


@command("evaluate", user_errors=(ValueError,))
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--truth", required=True, help="obs column with the true labels.")
@click.option("--pred", required=True, help="obs column with the predicted clusters.")
@click.option("--drop", multiple=True, help="Truth labels to leave out (e.g. --drop Mis).")
@click.option("--mod", help="Modality of a MuData store (default atac).")
def evaluate(store, truth, pred, drop, mod):
    """Print ARI, AMI, NMI, homogeneity, FMI and micro-F1 of PRED against TRUTH as JSON."""
    from ..store import open_atlas
    from ..tl.metrics import evaluate as scores

    atlas = open_atlas(store, mod=mod)
    obs = atlas.obs
    if atlas.is_mudata:  # joined labels live in the root obs of a MuData store
        obs = _with_root_obs(atlas.path, obs)
    for key in (truth, pred):
        if key not in obs:
            raise InputError(atlas.path, f"has no obs column {key!r}",
                             f"use one of: {', '.join(map(str, obs.columns))}")
    t = obs[truth].astype(object)
    t[t.isin(drop)] = None
    click.echo(json.dumps(scores(t.to_numpy(), obs[pred].astype(str).to_numpy()), indent=1))


def _with_root_obs(path: Path, obs):
    """``obs`` with the columns of the MuData root's obs that it lacks."""
    import zarr
    from anndata.io import read_elem

    root_obs = read_elem(zarr.open_group(str(path), mode="r")["obs"])
    return obs.join(root_obs[[c for c in root_obs.columns if c not in obs.columns]], how="left")
