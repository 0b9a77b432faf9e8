"""scEmbed's model bundle: a folder that holds everything ``encode`` and ``annotate`` need.

``vectors.npy`` (region vectors, in store peak order), ``universe.bed`` (the vocabulary as
``chr start end chr_start_end``), ``config.json`` (bundle version, parameters, training
summary) and, trained with labels, ``reference/``: ``embeddings.npy``, ``labels.tsv``,
``index.faiss`` (the HNSW index) and, with a UMAP, ``umap.pkl`` and ``umap_embedding.npy``.
"""

from __future__ import annotations

import json
import pickle
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import InputError

if TYPE_CHECKING:
    from .scembed import SCEMBED

BUNDLE_VERSION = 1


def write_bundle(model: SCEMBED, folder: str | Path, *, overwrite: bool = True) -> Path:
    """Write ``model``'s bundle, built beside ``folder`` and swapped in whole."""
    import faiss

    from ..store import replace_dir

    folder = Path(folder).absolute()
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        np.save(tmp / "vectors.npy", model.vectors_)
        model.universe_[["chr", "start", "end", "word"]].to_csv(tmp / "universe.bed", sep="\t", header=False,
                                                                 index=False)
        params = {k: v for k, v in asdict(model).items() if k not in ("progress", "history_")}
        cfg = {"version": BUNDLE_VERSION, "params": params, "train": getattr(model, "train_summary_", None),
               "has_reference": model.reference_ is not None}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        if getattr(model, "reference_", None) is not None:
            ref = tmp / "reference"
            ref.mkdir()
            np.save(ref / "embeddings.npy", model.reference_)
            pd.DataFrame({"label": model.label_names_[model.reference_codes_]}).to_csv(ref / "labels.tsv",
                                                                                      sep="\t", index=False)
            faiss.write_index(model.index_, str(ref / "index.faiss"))
            if model.umap_model_ is not None:
                with open(ref / "umap.pkl", "wb") as fh:
                    pickle.dump(model.umap_model_, fh)
                np.save(ref / "umap_embedding.npy", model.reference_umap_)
        replace_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_bundle(cls: type[SCEMBED], folder: str | Path) -> SCEMBED:
    """A ``cls`` with the vectors, universe and (when saved) reference of the bundle in ``folder``."""
    import faiss

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise InputError(folder, "is not a scEmbed model folder (no config.json)",
                         "pass the folder written by `scatac-dist scembed train --model-out`")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("version") != BUNDLE_VERSION:
        raise InputError(folder, f"bundle version {cfg.get('version')} (this code reads {BUNDLE_VERSION})",
                         "re-train the model with this version of scatac-dist")
    model = cls(**cfg["params"])
    model.train_summary_ = cfg.get("train")
    model.vectors_ = np.load(folder / "vectors.npy")
    uni = pd.read_csv(folder / "universe.bed", sep="\t", header=None, names=["chr", "start", "end", "word"],
                      dtype={"chr": str, "start": np.int64, "end": np.int64, "word": str})
    if len(uni) != model.vectors_.shape[0]:
        raise InputError(folder, f"universe.bed has {len(uni)} regions but vectors.npy {model.vectors_.shape[0]}",
                         "the bundle is damaged; save it again")
    model.universe_ = uni
    model.reference_, model.umap_model_, model.reference_umap_ = None, None, None
    ref = folder / "reference"
    if cfg.get("has_reference") and ref.exists():
        model.reference_ = np.load(ref / "embeddings.npy")
        labels = pd.read_csv(ref / "labels.tsv", sep="\t", dtype=str, keep_default_na=False)["label"].to_numpy()
        model.label_names_, model.reference_codes_ = np.unique(labels, return_inverse=True)
        model.index_ = faiss.read_index(str(ref / "index.faiss"))
        if (ref / "umap.pkl").exists():
            with open(ref / "umap.pkl", "rb") as fh:
                model.umap_model_ = pickle.load(fh)
            model.reference_umap_ = np.load(ref / "umap_embedding.npy")
    return model
