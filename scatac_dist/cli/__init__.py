"""The ``scatac-dist`` command line. Commands are thin: they call the public functions.

Global options choose where work runs (``--scheduler`` or an embedded local cluster shaped
by ``--workers``/``--memory-limit``) and whether a Dask performance report is written.
Errors about input are printed as one line (``error: FILE: problem. Fix: ...``) with exit
status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import click

from ..errors import ScatacError


class _Ctx:
    def __init__(self, scheduler, workers, threads, memory_limit, report, progress):
        self.scheduler = scheduler
        self.workers = workers
        self.threads = threads
        self.memory_limit = memory_limit
        self.report = report
        self.progress = progress
        self._client = None
        self.stack = ExitStack()

    def client(self):
        """Start (once) the cluster and the performance report, and print the dashboard."""
        if self._client is None:
            from ..cluster import get_client, maybe_performance_report

            self._client = get_client(self.scheduler, n_workers=self.workers,
                                      threads_per_worker=self.threads, memory_limit=self.memory_limit)
            self.stack.callback(self._close)
            where = self.scheduler or "embedded LocalCluster"
            click.echo(f"Dask: {where}, {len(self._client.scheduler_info()['workers'])} workers; "
                       f"dashboard: {self._client.dashboard_link}", err=True)
            self.stack.enter_context(maybe_performance_report(self.report))
        return self._client

    def _close(self):
        client, self._client = self._client, None
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--scheduler", metavar="tcp://HOST:PORT", envvar="SCATAC_DIST_SCHEDULER",
              help="Run on an existing Dask scheduler instead of an embedded local cluster.")
@click.option("--workers", type=int, help="Local cluster: worker processes (default: cores, max 8).")
@click.option("--threads-per-worker", type=int, help="Local cluster: threads per worker (default 1).")
@click.option("--memory-limit", metavar="SIZE", help="Local cluster: memory per worker, e.g. 4GiB.")
@click.option("--performance-report", type=click.Path(dir_okay=False),
              help="Write Dask's HTML performance report of the run to this file.")
@click.option("--no-progress", is_flag=True, help="Do not show progress bars.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for Dask's own).")
@click.version_option(package_name="scatac-dist")
@click.pass_context
def main(ctx, scheduler, workers, threads_per_worker, memory_limit, performance_report, no_progress,
         verbose):
    """scatac-dist: atlas-scale single-cell ATAC-seq analysis on Dask."""
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s", level=logging.WARNING)
    logging.getLogger("scatac_dist").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose < 2:
        for name in ("distributed", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.ERROR)
    ctx.obj = _Ctx(scheduler, workers, threads_per_worker, memory_limit, performance_report,
                   not no_progress)
    ctx.call_on_close(ctx.obj.stack.close)


def _run(fn):
    """Print ScatacErrors as one line and exit 2, as a CLI should for bad input."""
    try:
        return fn()
    except ScatacError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The atlas store to create (a .zarr folder).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="TSV of per-cell metadata, joined on its barcode (or first) column.")
@click.option("--format", "fmt", type=click.Choice(["auto", "10x-mtx", "10x-h5", "h5ad"]),
              default="auto", show_default=True)
@click.option("--chunk-rows", type=int, help="Cells per row chunk (default 10000).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new store is complete).")
@click.option("--round-counts", is_flag=True, help="Round non-integer counts instead of refusing them.")
@click.option("--join", type=click.Choice(["exact", "inner", "outer"]), default="exact", show_default=True,
              help="How to combine inputs whose peaks differ.")
@click.option("--batch-names", help="Comma-separated batch names, one per input (default: from paths).")
@click.option("--layer", help="For .h5ad input: read this layer instead of X.")
@click.pass_obj
def ingest(obj, inputs, out, labels, fmt, chunk_rows, overwrite, round_counts, join, batch_names, layer):
    """Turn 10x folders, 10x .h5 or .h5ad files into one chunked zarr atlas.

    Several INPUTS are stacked into one atlas with a 'batch' column in obs.
    """
    from ..io import ingest as _ingest

    def go():
        atlas = _ingest(list(inputs), out, format=fmt, labels=labels, chunk_rows=chunk_rows,
                        overwrite=overwrite, round_counts=round_counts, join=join,
                        batch_names=batch_names.split(",") if batch_names else None, layer=layer,
                        client=obj.client(), progress=obj.progress)
        click.echo(f"wrote {atlas.path}")
        click.echo(_describe(atlas.path))

    _run(go)


def _describe(path: Path) -> str:
    import zarr

    from ..store import open_atlas

    open_atlas(path)  # a clear error if this is not an atlas
    root = zarr.open_group(str(path), mode="r")
    mods = sorted(root["mod"].group_keys()) if root.attrs.get("encoding-type") == "MuData" else [None]
    lines = [f"store: {Path(path).absolute()} (zarr v{root.metadata.zarr_format})"]
    for mod in mods:
        a = open_atlas(path, mod=mod)
        g = a._group()
        x = g["X"]
        head = f"[{mod}] " if mod else ""
        lines.append(f"{head}X: {a.n_obs} cells x {a.n_vars} features, nnz {a.nnz} "
                     f"({a.nnz / max(a.n_obs, 1):.0f} per cell), dtype {x['data'].dtype}, "
                     f"{a.X.numblocks[0]} row chunk{'s' if a.X.numblocks[0] != 1 else ''} of {a.chunk_rows} cells")
        for slot in ("obs", "var"):
            cols = [c for c in g[slot].attrs.get("column-order", [])]
            lines.append(f"{head}{slot}: {', '.join(cols) or '(index only)'}")
        for slot in ("obsm", "varm", "obsp", "layers"):
            keys = a.keys(slot)
            if keys:
                lines.append(f"{head}{slot}: {', '.join(keys)}")
        for stage, rec in a.provenance().items():
            tot = rec.get("timings_s", {}).get("total")
            lines.append(f"{head}stage {stage}: {rec.get('finished_at')}"
                         + (f", {tot:.1f} s" if tot is not None else ""))
    return "\n".join(lines)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the provenance as JSON.")
def info(store, as_json):
    """Describe an atlas store: shape, chunks, slots and the stages that wrote it."""
    from ..store import open_atlas

    def go():
        if as_json:
            click.echo(json.dumps(open_atlas(store).provenance(), indent=2))
        else:
            click.echo(_describe(store))

    _run(go)


def _synth_options(f):
    for opt in reversed([
        click.option("--cells", "n_cells", type=int, default=50_000, show_default=True),
        click.option("--peaks", "n_peaks", type=int, default=100_000, show_default=True),
        click.option("--clusters", "n_clusters", type=int, default=10, show_default=True),
        click.option("--fragments", type=float, default=1000.0, show_default=True,
                     help="Median fragments per cell."),
        click.option("--signal", type=float, default=0.25, show_default=True,
                     help="Share of a cell's fragments in its type's specific peaks."),
        click.option("--batches", "n_batches", type=int, default=1, show_default=True),
        click.option("--batch-effect", type=float, default=0.0, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--chunk-rows", type=int),
    ]):
        f = opt(f)
    return f


def _params(kw):
    from ..datasets import SynthParams

    keys = ("n_cells", "n_peaks", "n_clusters", "fragments", "signal", "n_batches", "batch_effect", "seed")
    return SynthParams(**{k: kw[k] for k in keys})


@main.command()
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@_synth_options
@click.option("--overwrite", is_flag=True)
@click.pass_obj
def synth(obj, out, overwrite, chunk_rows, **kw):
    """Generate a synthetic labelled atlas straight into a store."""
    from ..datasets import synthesize

    def go():
        atlas = synthesize(out, _params(kw), chunk_rows=chunk_rows, overwrite=overwrite,
                           client=obj.client(), progress=obj.progress)
        click.echo(f"wrote {atlas.path}")
        click.echo(_describe(atlas.path))

    _run(go)


@main.command()
@click.option("--outdir", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True,
              help="Where the store, report and plots go.")
@_synth_options
@click.option("--force", is_flag=True, help="Re-run stages already done.")
@click.pass_context
def demo(ctx, outdir, force, chunk_rows, **kw):
    """Run the pipeline available so far on a generated atlas (a store, QC, plots, report)."""
    obj = ctx.obj
    if obj.report is None:
        obj.report = str(outdir / "dask-report.html")

    def go():
        from .. import pl
        from ..datasets import synthesize
        from ..pipeline import STAGES, Stage, run_stages
        from ..store import open_atlas

        outdir.mkdir(parents=True, exist_ok=True)
        store = outdir / "atlas.zarr"
        params = _params(kw)
        client = obj.client()
        prev = open_atlas(store).provenance().get("synth", {}) if store.exists() else {}
        from dataclasses import asdict

        if force or prev.get("params", {}).get("params") != asdict(params):
            synthesize(store, params, chunk_rows=chunk_rows, overwrite=True, client=client,
                       progress=obj.progress)
        else:
            click.echo(f"{store} already holds this synthetic atlas; reusing it")
        atlas = open_atlas(store)
        report = run_stages(atlas, [Stage("qc", STAGES["qc"])], client=client, force=force,
                            progress=obj.progress)
        png = pl.qc(atlas, outdir / "qc.png")
        click.echo(_describe(store))
        click.echo(f"stages: {json.dumps(report)}")
        click.echo(f"store:              {store.absolute()}")
        click.echo(f"performance report: {Path(obj.report).absolute()} (written on exit)")
        click.echo(f"plots:              {png.absolute()}")

    _run(go)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--config", type=click.Path(exists=True, dir_okay=False),
              help="YAML mapping stage names to parameters, e.g. {lsi: {n_comps: 50}}.")
@click.option("--n-clusters", type=int, help="Search Leiden's resolution to K clusters and run k-means with K.")
@click.option("--mod", help="Modality of a MuData store (default atac).")
@click.option("--force", is_flag=True, help="Re-run stages already done with the same parameters.")
@click.pass_obj
def run(obj, store, config, n_clusters, mod, force):
    """Run the default pipeline: QC, filter, feature selection, TF-IDF, LSI, spectral
    embedding, neighbours, Leiden (and k-means with --n-clusters), UMAP. Resumable."""
    from ..pipeline import default_stages, run_stages
    from ..store import open_atlas

    def go():
        import yaml

        atlas = open_atlas(store, mod=mod)
        if n_clusters is not None and not 1 <= n_clusters <= atlas.n_obs:
            raise click.BadParameter(f"must be between 1 and the {atlas.n_obs} cells", param_hint="--n-clusters")
        overrides = yaml.safe_load(Path(config).read_text()) if config else {}
        try:
            stages = default_stages(n_clusters, overrides)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--config") from None
        if atlas.nnz == 0:
            raise click.ClickException(f"{store} holds no counts (nnz = 0); ingest a non-empty matrix")
        report = run_stages(atlas, stages, client=obj.client(), force=force, progress=obj.progress)
        click.echo(json.dumps(report, indent=1))
        click.echo(_describe(store))

    _run(go)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--mode", type=click.Choice(["auto", "exact", "atlas"]), default="auto", show_default=True,
              help="atlas: Z on each cell's nearest cells; exact: dense n x n (small data); auto: atlas unless "
                   "there are at most k-neighbors + 1 cells.")
@click.option("--k-neighbors", type=int, default=30, show_default=True, help="Atlas mode: neighbours per cell in Z.")
@click.option("--support", type=click.Choice(["knn", "jaccard"]), default="knn", show_default=True,
              help="Atlas mode: nearest cells in the NMF embedding re-ranked by Jaccard, or the exact "
                   "top-k Jaccard (O(n^2)).")
@click.option("--n-factors", type=int, help="K (default: Tracy-Widom estimate).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="scCASER: a bulk matrix (CSV/TSV, peaks x samples) or, with --reference-labels, a labelled "
                   "single-cell .h5ad/.zarr to pseudo-bulk.")
@click.option("--reference-labels", metavar="KEY", help="scCASER: obs column of --reference to pseudo-bulk by.")
@click.option("--self-reference", is_flag=True, help="scCASER: pseudo-bulk of the target's own Leiden clusters.")
@click.option("--alpha", type=float, default=1.0, show_default=True, help="scCASER: weight of |P - W1|^2.")
@click.option("--max-iter", type=int, default=30, show_default=True)
@click.option("--enhanced-top", type=int, help="Keep only each cell's N largest enhanced values.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mod", help="Modality of a MuData store (default atac).")
@click.pass_obj
def sccase(obj, store, mode, k_neighbors, support, n_factors, reference, reference_labels, self_reference, alpha,
           max_iter, enhanced_top, seed, mod):
    """scCASE / scCASER enhancement. Writes obsm['X_sccase'] (H^T), varm['sccase_W'],
    layers['sccase'] (X Z) and obsm['X_sccase_pca'] (TF-IDF of X Z, 50 PCs)."""
    from ..models import SCCASE
    from ..store import open_atlas

    def go():
        atlas = open_atlas(store, mod=mod)
        obj.client()
        try:
            m = SCCASE(n_factors=n_factors, mode=mode, k_neighbors=k_neighbors, support=support,
                       reference=reference, reference_labels=reference_labels, self_reference=self_reference,
                       alpha=alpha, max_iter=max_iter, enhanced_top=enhanced_top, seed=seed).fit(atlas)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from None
        r = m.result_
        click.echo(json.dumps({k: r[k] for k in ("mode", "n_cells", "n_peaks", "n_factors", "n_ref_factors",
                                                  "n_iter", "converged", "enhanced_nnz")}
                              | {"loss_first": r["losses"][0], "loss_last": r["losses"][-1],
                                 "seconds": m.timings_}, indent=1))

    _run(go)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--n-clusters", type=int, help="Mixture components and k-means clusters (default: Tracy-Widom estimate).")
@click.option("--quick", is_flag=True, help="Quick mode: encoder 1024-128 instead of 3200-1600-800-400.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Training processes on this machine (DDP). Under torchrun or srun the job's ranks are used.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-iter", type=int, default=30_000, show_default=True, help="Most optimisation steps.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Cells per step, over all processes.")
@click.option("--lr-schedule", type=click.Choice(["constant", "paper"]), default="constant", show_default=True,
              help="constant: --lr throughout; paper: --lr x 0.9 every 10 steps down to 2e-4 (the paper-era code).")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="(Initial) learning rate.")
@click.option("--patience", type=int, default=10, show_default=True, help="Early stopping: epochs without improvement.")
@click.option("--min-iter", type=int, default=10000, show_default=True, help="No early stopping before this many steps.")
@click.option("--min-cells", type=int, default=5, show_default=True, help="Peak filter: cells with --min-reads reads.")
@click.option("--min-reads", type=int, default=2, show_default=True)
@click.option("--depth-norm", is_flag=True,
              help="Scale each cell's encoder input to the median open peaks per cell (the likelihood stays binary).")
@click.option("--depth-offset/--no-depth-offset", default=True, show_default=True,
              help="Add log(open peaks / median) to each cell's decoder logits in training (a library-size "
                   "term); --no-depth-offset is the paper's decoder exactly.")
@click.option("--impute", is_flag=True, help="Write layers['scale_impute'] (dense, chunked) and layers['scale_binary'].")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), help="Folder for checkpoints.")
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Steps between checkpoints (0: none).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --checkpoint-dir.")
@click.option("--model-out", type=click.Path(path_type=Path), help="Save the trained model to this folder.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), help="Append training metrics (JSON lines) here.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mod", help="Modality of a MuData store (default atac).")
@click.pass_obj
def scale(obj, store, n_clusters, quick, nproc, device, max_iter, batch_size, lr_schedule, lr, patience, min_iter,
          min_cells, min_reads, depth_norm, depth_offset, impute, checkpoint_dir, checkpoint_every, resume, model_out, log_path, seed, mod):
    """SCALE (VAE with a Gaussian-mixture prior). Writes obsm['X_scale'], obs['scale_gmm'],
    obs['scale_kmeans'] (with --n-clusters), peak scores in var/varm, and with --impute the
    imputed and binarised layers."""
    from ..models import SCALE
    from ..store import open_atlas
    from ..train import DistEnv

    def go():
        env = DistEnv.from_environ()
        if resume and not checkpoint_dir:
            raise click.UsageError("--resume needs --checkpoint-dir")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise click.ClickException("--device cuda: no CUDA device is visible here; use --device cpu")
        atlas = open_atlas(store, mod=mod)
        if not env.distributed:  # under torchrun/srun every rank preprocesses with local threads
            obj.client()
        try:
            m = SCALE(n_clusters=n_clusters, quick=quick, nproc=nproc, device=device, max_iter=max_iter,
                      batch_size=batch_size, lr_schedule=lr_schedule, lr=lr, patience=patience, min_iter=min_iter,
                      min_cells=min_cells,
                      min_reads=min_reads, depth_norm=depth_norm, depth_offset=depth_offset, impute=impute, checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                      checkpoint_every=checkpoint_every, resume=resume, seed=seed, progress=obj.progress,
                      log_path=str(log_path) if log_path else None).fit(atlas)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from None
        if env.rank != 0:
            return
        if model_out:
            m.save(model_out)
        s = m.summary_
        click.echo(json.dumps({"n_clusters": m.n_clusters_, "steps": s["steps"], "epochs": s["epochs"],
                               "stopped_early": s["stopped_early"], "world_size": s["world_size"],
                               "cells_per_s": s["cells_per_s"],
                               "loss_last": s["history"][-1] if s["history"] else None,
                               "seconds": m.timings_}, indent=1))

    _run(go)


@main.group()
def scembed():
    """scEmbed: word2vec region embeddings, cell embeddings, projection and label transfer."""


@scembed.command("train")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--dim", type=int, default=100, show_default=True, help="Embedding size.")
@click.option("--window", type=int, default=5, show_default=True, help="word2vec context window.")
@click.option("--workers", type=int, help="gensim training threads (default: cores).")
@click.option("--min-count", type=int, default=5, show_default=True,
              help="Vocabulary: regions accessible in at least this many cells.")
@click.option("--alpha", type=float, default=0.1, show_default=True, help="Initial learning rate (x0.95 per epoch).")
@click.option("--corpus", type=click.Choice(["file", "iterable"]), default="file", show_default=True,
              help="file: shards written by the Dask workers, the next epoch while this one trains; "
                   "iterable: read in this process (small data).")
@click.option("--corpus-dir", type=click.Path(path_type=Path),
              help="Folder for corpus files (default: a temporary folder; must be visible to the workers).")
@click.option("--skip-gram", is_flag=True, help="word2vec skip-gram instead of CBOW (about 3.4x slower).")
@click.option("--labels", "labels_key", metavar="KEY", help="obs column to keep as reference labels for annotate.")
@click.option("--no-umap", is_flag=True, help="Do not fit the reference UMAP (EV-projection).")
@click.option("--model-out", type=click.Path(path_type=Path), help="Save the model bundle to this folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mod", help="Modality of a MuData store (default atac).")
@click.pass_obj
def scembed_train(obj, store, epochs, dim, window, workers, min_count, alpha, corpus, corpus_dir, skip_gram, labels_key,
                  no_umap, model_out, seed, mod):
    """Train on STORE and write obsm['X_scembed'] (and, with --labels, the reference for annotate)."""
    from ..models import SCEMBED
    from ..store import open_atlas

    def go():
        atlas = open_atlas(store, mod=mod)
        obj.client()
        try:
            m = SCEMBED(epochs=epochs, dim=dim, window=window, workers=workers, min_count=min_count, alpha=alpha,
                        corpus=corpus, corpus_dir=str(corpus_dir) if corpus_dir else None, sg=int(skip_gram),
                        labels_key=labels_key,
                        umap=not no_umap, seed=seed, progress=obj.progress).fit(atlas)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from None
        if model_out:
            m.save(model_out)
        click.echo(json.dumps(m.train_summary_ | {"seconds": m.timings_}, indent=1))

    _run(go)


def _scembed_model(folder):
    from ..models import SCEMBED

    return SCEMBED.load(folder)


@scembed.command("encode")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="A trained model bundle.")
@click.option("--key-added", default="X_scembed", show_default=True)
@click.option("--no-umap", is_flag=True, help="E-projection only (no placement through the reference UMAP).")
@click.option("--mod", help="Modality of a MuData store (default atac).")
@click.pass_obj
def scembed_encode(obj, store, model_dir, key_added, no_umap, mod):
    """Project STORE (peaks may differ from the model's: mapped by overlap) into obsm[KEY]."""
    from ..store import open_atlas

    def go():
        m = _scembed_model(model_dir)
        atlas = open_atlas(store, mod=mod)
        obj.client()
        try:
            _, report = m.encode(atlas, key_added=key_added, umap=not no_umap)
        except (ValueError, KeyError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(json.dumps(report, indent=1))

    _run(go)


@scembed.command("annotate")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="A model bundle trained with --labels.")
@click.option("--k", type=int, default=15, show_default=True, help="Reference neighbours per cell.")
@click.option("--min-confidence", type=float, default=0.5, show_default=True,
              help="A label is confident when this share of the neighbours carries it.")
@click.option("--no-cluster-vote", is_flag=True, help="Keep each cell's own kNN vote.")
@click.option("--resolution", type=float,
              help="Leiden resolution of the cluster vote (default: searched for --clusters-per-label).")
@click.option("--clusters-per-label", type=float, default=3.0, show_default=True,
              help="Cluster vote: clusters per reference label (at most one per 10 cells).")
@click.option("--mod", help="Modality of a MuData store (default atac).")
@click.pass_obj
def scembed_annotate(obj, store, model_dir, k, min_confidence, no_cluster_vote, resolution, clusters_per_label, mod):
    """Label STORE's cells from the model's reference: obs['scembed_label'], obs['scembed_confidence']."""
    from ..store import open_atlas

    def go():
        m = _scembed_model(model_dir)
        atlas = open_atlas(store, mod=mod)
        obj.client()
        try:
            summary = m.annotate(atlas, k=k, min_confidence=min_confidence, by_cluster=not no_cluster_vote,
                                 resolution=resolution, clusters_per_label=clusters_per_label)
        except (ValueError, KeyError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(json.dumps(summary, indent=1, default=str))

    _run(go)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--color", required=True, help="obs column to colour by.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="PNG path (default STORE_umap_COLOR.png).")
@click.option("--basis", default="X_umap", show_default=True)
@click.option("--mod")
def plot(store, color, output, basis, mod):
    """Write a UMAP (or any 2-D obsm) scatter PNG coloured by an obs column."""
    from .. import pl
    from ..store import open_atlas

    def go():
        out = output or Path(f"{Path(store).with_suffix('')}_umap_{color.replace(' ', '_')}.png")
        try:
            png = pl.umap(open_atlas(store, mod=mod), out, color=color, basis=basis)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"wrote {png}")

    _run(go)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--truth", required=True, help="obs column with the true labels.")
@click.option("--pred", required=True, help="obs column with the predicted clusters.")
@click.option("--drop", multiple=True, help="Truth labels to leave out (e.g. --drop Mis).")
@click.option("--mod")
def evaluate(store, truth, pred, drop, mod):
    """Print ARI, AMI, NMI, homogeneity, FMI and micro-F1 of PRED against TRUTH as JSON."""
    import zarr

    from ..store import open_atlas
    from ..tl.metrics import evaluate as _evaluate

    def go():
        atlas = open_atlas(store, mod=mod)
        obs = atlas.obs
        if atlas.is_mudata:  # joined labels live in the root obs of a MuData store
            from anndata.io import read_elem

            root_obs = read_elem(zarr.open_group(str(atlas.path), mode="r")["obs"])
            obs = pd_concat(obs, root_obs)
        for key in (truth, pred):
            if key not in obs:
                raise click.ClickException(f"{store} has no obs column {key!r}; columns: {', '.join(obs.columns)}")
        t = obs[truth].astype(object)
        t[t.isin(drop)] = None
        click.echo(json.dumps(_evaluate(t.to_numpy(), obs[pred].astype(str).to_numpy()), indent=1))

    _run(go)


def pd_concat(a, b):
    return a.join(b[[c for c in b.columns if c not in a.columns]], how="left")


if __name__ == "__main__":  # pragma: no cover
    main()
