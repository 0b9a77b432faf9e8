"""``sccase``: scCASE / scCASER enhancement (:class:`scatac_dist.models.SCCASE`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .context import Session, bars_on_stderr, command, pass_session
from .defaults import option_from

__all__ = ["sccase"]

sccase_option = option_from("scatac_dist.models:SCCASE")

SUMMARY_KEYS = ("mode", "n_cells", "n_peaks", "n_factors", "n_ref_factors", "n_iter", "converged", "enhanced_nnz")


@command("sccase", user_errors=(ValueError, KeyError, FileNotFoundError))
@click.argument("store", type=click.Path(path_type=Path))
@sccase_option("--mode", type=click.Choice(["auto", "exact", "atlas"]),
               help="atlas: Z on each cell's nearest cells; exact: dense n x n (small data); auto: atlas unless "
                    "there are at most k-neighbors + 1 cells.")
@sccase_option("--k-neighbors", type=int, help="Atlas mode: neighbours per cell in Z.")
@sccase_option("--support", type=click.Choice(["knn", "jaccard"]),
               help="Atlas mode: nearest cells in the NMF embedding re-ranked by Jaccard, or the exact "
                    "top-k Jaccard (O(n^2)).")
@sccase_option("--n-factors", type=int, help="K (default: estimated, see --k-estimator).")
@sccase_option("--k-estimator", type=click.Choice(["aster", "tracy-widom"]),
               help="How K is estimated: ASTER's number of cell types + 1 (the paper) or Tracy-Widom.")
@sccase_option("--reference", type=click.Path(path_type=Path),
               help="scCASER: a bulk matrix (CSV/TSV, peaks x samples) or, with --reference-labels, a labelled "
                    "single-cell .h5ad/.zarr to pseudo-bulk.")
@sccase_option("--reference-labels", metavar="KEY", help="scCASER: obs column of --reference to pseudo-bulk by.")
@click.option("--self-reference", is_flag=True, help="scCASER: pseudo-bulk of the target's own Leiden clusters.")
@sccase_option("--alpha", type=float, help="scCASER: weight of |P - W1|^2.")
@sccase_option("--max-iter", type=int)
@sccase_option("--enhanced-top", type=int, help="Keep only each cell's N largest enhanced values (default: all).")
@sccase_option("--seed", type=int)
@click.option("--mod", help="Modality of a MuData store (default atac).")
@pass_session
def sccase(session: Session, store, mode, k_neighbors, support, n_factors, k_estimator, reference, reference_labels,
           self_reference, alpha, max_iter, enhanced_top, seed, mod):
    """scCASE / scCASER enhancement. Writes obsm['X_sccase'] (H^T), varm['sccase_W'],
    layers['sccase'] (X Z) and obsm['X_sccase_pca'] (TF-IDF of X Z, 50 PCs)."""
    from ..models import SCCASE
    from ..store import open_atlas

    atlas = open_atlas(store, mod=mod)
    session.lock(atlas.path)
    session.client()
    switches = {"self_reference": True} if self_reference else {}
    with bars_on_stderr():
        m = SCCASE(n_factors=n_factors, k_estimator=k_estimator, mode=mode, k_neighbors=k_neighbors, support=support, reference=reference,
                   reference_labels=reference_labels, alpha=alpha, max_iter=max_iter, enhanced_top=enhanced_top,
                   seed=seed, **switches).fit(atlas)
    r = m.result_
    click.echo(json.dumps({k: r[k] for k in SUMMARY_KEYS}
                          | {"loss_first": r["losses"][0], "loss_last": r["losses"][-1], "seconds": m.timings_},
                          indent=1))
