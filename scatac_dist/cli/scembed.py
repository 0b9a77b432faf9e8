"""``scembed train|encode|annotate``: scEmbed (:class:`scatac_dist.models.SCEMBED`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .context import Group, Session, bars_on_stderr, pass_session
from .defaults import option_from

__all__ = ["scembed"]

train_option = option_from("scatac_dist.models:SCEMBED")
encode_option = option_from("scatac_dist.models:SCEMBED.encode")
annotate_option = option_from("scatac_dist.models:SCEMBED.annotate")
MODEL_ERRORS = (ValueError, KeyError, FileNotFoundError)


@click.group("scembed", cls=Group)
def scembed():
    """scEmbed: word2vec region embeddings, cell embeddings, projection and label transfer."""


def _load(folder: Path, session: Session):
    from ..models import SCEMBED

    model = SCEMBED.load(folder)
    model.progress = session.progress
    return model


@scembed.command("train", user_errors=MODEL_ERRORS)
@click.argument("store", type=click.Path(path_type=Path))
@train_option("--epochs", type=int)
@train_option("--dim", type=int, help="Embedding size.")
@train_option("--window", type=int, help="word2vec context window.")
@train_option("--workers", type=int, help="gensim training threads (default: cores).")
@train_option("--min-count", type=int, help="Vocabulary: regions accessible in at least this many cells.")
@train_option("--alpha", type=float, help="Initial learning rate (x0.95 per epoch).")
@train_option("--corpus", type=click.Choice(["file", "iterable"]),
              help="file: shards written by the Dask workers, the next epoch while this one trains; "
                   "iterable: read in this process (small data).")
@train_option("--corpus-dir", type=click.Path(path_type=Path),
              help="Folder for corpus files (default: beside the store, in its .resume folder; "
                   "must be visible to the workers).")
@click.option("--skip-gram", is_flag=True, help="word2vec skip-gram instead of CBOW (about 3.4x slower).")
@train_option("--labels", "labels_key", metavar="KEY", help="obs column to keep as reference labels for annotate.")
@click.option("--no-umap", is_flag=True, help="Do not fit the reference UMAP (EV-projection).")
@click.option("--model-out", type=click.Path(path_type=Path), help="Save the model bundle to this folder.")
@train_option("--seed", type=int)
@click.option("--mod", help="Modality of a MuData store (default atac).")
@pass_session
def train(session: Session, store, epochs, dim, window, workers, min_count, alpha, corpus, corpus_dir, skip_gram,
          labels_key, no_umap, model_out, seed, mod):
    """Train on STORE and write obsm['X_scembed'] (and, with --labels, the reference for annotate).

    A killed run, started again with the same command, goes on from the last finished epoch."""
    from ..models import SCEMBED
    from ..store import open_atlas

    atlas = open_atlas(store, mod=mod)
    session.lock(atlas.path)
    session.client()
    switches = ({"sg": 1} if skip_gram else {}) | ({"umap": False} if no_umap else {})
    with bars_on_stderr():
        m = SCEMBED(epochs=epochs, dim=dim, window=window, workers=workers, min_count=min_count, alpha=alpha,
                    corpus=corpus, corpus_dir=str(corpus_dir) if corpus_dir else None, labels_key=labels_key,
                    seed=seed, progress=session.progress, **switches).fit(atlas, model_out=model_out)
    click.echo(json.dumps(m.train_summary_ | {"seconds": m.timings_}, indent=1))


@scembed.command("encode", user_errors=MODEL_ERRORS)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="A trained model bundle.")
@encode_option("--key-added")
@click.option("--no-umap", is_flag=True, help="E-projection only (no placement through the reference UMAP).")
@click.option("--mod", help="Modality of a MuData store (default atac).")
@pass_session
def encode(session: Session, store, model_dir, key_added, no_umap, mod):
    """Project STORE (peaks may differ from the model's: mapped by overlap) into obsm[KEY]."""
    from ..store import open_atlas

    m = _load(model_dir, session)
    atlas = open_atlas(store, mod=mod)
    session.lock(atlas.path)
    session.client()
    switches = {"umap": False} if no_umap else {}
    with bars_on_stderr():
        _, report = m.encode(atlas, key_added=key_added, **switches)
    click.echo(json.dumps(report, indent=1))


@scembed.command("annotate", user_errors=MODEL_ERRORS)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="A model bundle trained with --labels.")
@annotate_option("--k", type=int, help="Reference neighbours per cell.")
@annotate_option("--min-confidence", type=float,
                 help="A label is confident when this share of the neighbours carries it.")
@click.option("--no-cluster-vote", is_flag=True, help="Keep each cell's own kNN vote.")
@annotate_option("--resolution", type=float,
                 help="Leiden resolution of the cluster vote (default: searched for --clusters-per-label).")
@annotate_option("--clusters-per-label", type=float,
                 help="Cluster vote: clusters per reference label (at most one per 10 cells).")
@click.option("--mod", help="Modality of a MuData store (default atac).")
@pass_session
def annotate(session: Session, store, model_dir, k, min_confidence, no_cluster_vote, resolution, clusters_per_label,
             mod):
    """Label STORE's cells from the model's reference: obs['scembed_label'], obs['scembed_confidence']."""
    from ..store import open_atlas

    m = _load(model_dir, session)
    atlas = open_atlas(store, mod=mod)
    session.lock(atlas.path)
    session.client()
    switches = {"by_cluster": False} if no_cluster_vote else {}
    with bars_on_stderr():
        summary = m.annotate(atlas, k=k, min_confidence=min_confidence, resolution=resolution,
                             clusters_per_label=clusters_per_label, **switches)
    click.echo(json.dumps(summary, indent=1, default=str))
