"""``scale``: SCALE, a VAE with a Gaussian-mixture prior (:class:`scatac_dist.models.SCALE`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .context import CommandError, Session, bars_on_stderr, command, pass_session
from .defaults import option_from

__all__ = ["scale"]

scale_option = option_from("scatac_dist.models:SCALE")


@command("scale", user_errors=(ValueError, KeyError, FileNotFoundError))
@click.argument("store", type=click.Path(path_type=Path))
@scale_option("--n-clusters", type=int,
              help="Mixture components and k-means clusters (default: Tracy-Widom estimate).")
@scale_option("--quick/--full-encoder",
              help="--full-encoder: the paper's 3200-1600-800-400 encoder instead of the authors' 1024-128 "
                   "(--quick).")
@scale_option("--nproc", type=int,
              help="Training processes on this machine (DDP). Under torchrun or srun the job's ranks are used.")
@scale_option("--device", type=click.Choice(["cpu", "cuda"]))
@scale_option("--max-iter", type=int, help="Most optimisation steps.")
@scale_option("--batch-size", type=int, help="Cells per step, over all processes.")
@scale_option("--lr-schedule", type=click.Choice(["constant", "paper"]),
              help="constant: --lr throughout; paper: --lr x 0.9 every 10 steps down to 2e-4 (the paper-era code).")
@scale_option("--lr", type=float, help="(Initial) learning rate (default: SCALE's own).")
@scale_option("--patience", type=int, help="Early stopping: epochs without improvement.")
@scale_option("--min-iter", type=int, help="No early stopping before this many steps.")
@scale_option("--min-cells", type=int, help="Peak filter: cells with --min-reads reads.")
@scale_option("--min-reads", type=int, help="Peak filter: reads per cell (binarised 0/1 input: 1).")
@click.option("--depth-norm", is_flag=True,
              help="Scale each cell's encoder input to the median open peaks per cell (the likelihood stays binary).")
@scale_option("--depth-offset/--no-depth-offset",
              help="Add log(open peaks / median) to each cell's decoder logits in training (a library-size "
                   "term); --no-depth-offset is the paper's decoder exactly.")
@click.option("--impute", is_flag=True, help="Write layers['scale_impute'] (dense, chunked) and layers['scale_binary'].")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path),
              help="Folder for checkpoints (one run's; a run that does not resume takes it over).")
@scale_option("--checkpoint-every", type=int,
              help="Steps between checkpoints (default: 1,000 when checkpoints are kept; 0: none).")
@click.option("--resume", type=click.Choice(["no", "yes", "auto"]), default="no", show_default=True,
              is_flag=False, flag_value="yes",
              help="yes (or --resume alone): continue the newest checkpoint in --checkpoint-dir. auto: continue it "
                   "when there is one, else start fresh; without --checkpoint-dir the checkpoints go beside the "
                   "store and are removed once the outputs are written, so a restarted job reruns the same "
                   "command. A checkpoint of other data or parameters is refused.")
@click.option("--model-out", type=click.Path(path_type=Path), help="Save the trained model to this folder.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), help="Append training metrics (JSON lines) here.")
@scale_option("--seed", type=int)
@click.option("--mod", help="Modality of a MuData store (default atac).")
@pass_session
def scale(session: Session, store, n_clusters, quick, nproc, device, max_iter, batch_size, lr_schedule, lr, patience,
          min_iter, min_cells, min_reads, depth_norm, depth_offset, impute, checkpoint_dir, checkpoint_every, resume,
          model_out, log_path, seed, mod):
    """SCALE (VAE with a Gaussian-mixture prior). Writes obsm['X_scale'], obs['scale_gmm'],
    obs['scale_kmeans'] (with --n-clusters), peak scores in var/varm, and with --impute the
    imputed and binarised layers."""
    from ..models import SCALE
    from ..store import open_atlas
    from ..train import DistEnv

    env = DistEnv.from_environ()
    if resume == "yes" and not checkpoint_dir:
        raise click.UsageError("--resume (yes) needs --checkpoint-dir; --resume auto works without one")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA device is visible here. Fix: use --device cpu")
    atlas = open_atlas(store, mod=mod)
    if env.rank == 0:  # the rank that writes; the others only read
        session.lock(atlas.path)
    if not env.distributed:  # under torchrun/srun every rank preprocesses with local threads
        session.client()
    # one-way switches change the model's default only when given
    switches = {k: True for k, on in (("depth_norm", depth_norm), ("impute", impute)) if on}
    if resume != "no":
        switches["resume"] = "auto" if resume == "auto" else True
    with bars_on_stderr():
        m = SCALE(n_clusters=n_clusters, quick=quick, nproc=nproc, device=device, max_iter=max_iter,
                  batch_size=batch_size, lr_schedule=lr_schedule, lr=lr, patience=patience, min_iter=min_iter,
                  min_cells=min_cells, min_reads=min_reads, depth_offset=depth_offset,
                  checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, checkpoint_every=checkpoint_every,
                  seed=seed, progress=session.progress, log_path=str(log_path) if log_path else None,
                  **switches).fit(atlas)
    if env.rank != 0:
        return
    if model_out:
        m.save(model_out)
    s = m.summary_
    click.echo(json.dumps({"n_clusters": m.n_clusters_, "steps": s["steps"], "epochs": s["epochs"],
                           "stopped_early": s["stopped_early"], "world_size": s["world_size"],
                           "cells_per_s": s["cells_per_s"], "resumed_from": s["start_step"],
                           "loss_last": s["history"][-1] if s["history"] else None,
                           "seconds": m.timings_}, indent=1))
