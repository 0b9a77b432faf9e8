"""``scmvp``: scMVP, the joint RNA + ATAC multi-view VAE (:class:`scatac_dist.models.SCMVP`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .context import CommandError, Session, bars_on_stderr, command, pass_session
from .defaults import option_from

__all__ = ["scmvp"]

scmvp_option = option_from("scatac_dist.models:SCMVP")


@command("scmvp", user_errors=(ValueError, KeyError, FileNotFoundError))
@click.argument("store", type=click.Path(path_type=Path))
@scmvp_option("--n-clusters", type=int,
              help="Mixture components and k-means clusters (default: Tracy-Widom estimate on the ATAC).")
@scmvp_option("--nproc", type=int,
              help="Training processes on this machine (DDP). Under torchrun or srun the job's ranks are used.")
@scmvp_option("--device", type=click.Choice(["cpu", "cuda"]))
@scmvp_option("--max-epochs", type=int, help="Epochs (all of them are trained).")
@scmvp_option("--max-steps", type=int, help="Stop after this many steps, even within an epoch (throughput runs).")
@scmvp_option("--batch-size", type=int, help="Cells per step, over all processes.")
@scmvp_option("--lr", type=float, help="Adam's learning rate.")
@scmvp_option("--min-cells", type=int, help="Genes and peaks detected in fewer cells are left out.")
@click.option("--impute", default="", metavar="rna,atac",
              help="Imputed layers to write: rna (mod/rna layers['scmvp_impute'], dense, chunked), atac "
                   "(mod/atac layers['scmvp_impute_top'], each cell's top --impute-top peaks).")
@scmvp_option("--impute-top", type=int, help="Peaks kept per cell in the ATAC imputation.")
@scmvp_option("--cycle/--no-cycle",
              help="--no-cycle: train without the cycle-consistency terms (an ablation; the paper trains with them).")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path),
              help="Folder for checkpoints (one run's; a run that does not resume takes it over).")
@scmvp_option("--checkpoint-every", type=int,
              help="Steps between checkpoints (default: 500 when checkpoints are kept; 0: none).")
@click.option("--resume", type=click.Choice(["no", "yes", "auto"]), default="no", show_default=True,
              is_flag=False, flag_value="yes",
              help="yes (or --resume alone): continue the newest checkpoint in --checkpoint-dir. auto: continue it "
                   "when there is one, else start fresh (without --checkpoint-dir the checkpoints go beside the "
                   "store). A checkpoint of other data or parameters is refused.")
@click.option("--model-out", type=click.Path(path_type=Path), help="Save the trained model to this folder.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), help="Append training metrics (JSON lines) here.")
@scmvp_option("--seed", type=int)
@pass_session
def scmvp(session: Session, store, n_clusters, nproc, device, max_epochs, max_steps, batch_size, lr, min_cells, impute, impute_top,
          cycle, checkpoint_dir, checkpoint_every, resume, model_out, log_path, seed):
    """scMVP (joint RNA + ATAC multi-view VAE) on a multiome store. Writes obsm['X_scmvp'] (root and
    both modalities), obs['scmvp_gmm'], obs['scmvp_kmeans'] (with --n-clusters) and, with --impute,
    the imputed layers."""
    from ..models import SCMVP
    from ..train import DistEnv

    env = DistEnv.from_environ()
    if resume == "yes" and not checkpoint_dir:
        raise click.UsageError("--resume (yes) needs --checkpoint-dir; --resume auto works without one")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: no CUDA device is visible here. Fix: use --device cpu")
    if env.rank == 0:
        session.lock(Path(store))
    if not env.distributed:
        session.client()
    extra = {"resume": "auto" if resume == "auto" else True} if resume != "no" else {}
    with bars_on_stderr():
        m = SCMVP(n_clusters=n_clusters, nproc=nproc, device=device, max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size,
                  lr=lr, min_cells=min_cells, impute=tuple(x for x in impute.split(",") if x), impute_top=impute_top, cycle=cycle,
                  checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, checkpoint_every=checkpoint_every,
                  seed=seed, progress=session.progress, log_path=str(log_path) if log_path else None,
                  **extra).fit(store)
    if env.rank != 0:
        return
    if model_out:
        m.save(model_out)
    s = m.summary_
    click.echo(json.dumps({"n_clusters": m.n_clusters_, "steps": s["steps"], "epochs": s["epochs"],
                           "world_size": s["world_size"], "cells_per_s": s["cells_per_s"],
                           "resumed_from": s["start_step"], "loss_last": s["history"][-1] if s["history"] else None,
                           "seconds": m.timings_}, indent=1))
