"""SCALE on a GPU: bf16 autocast training, and NCCL DDP when there are two devices.

Marked ``gpu``: deselected by default and skipped where torch sees no CUDA device (CI has none);
run with ``pytest -m gpu`` on a GPU node.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.train import launch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]


@pytest.fixture(scope="module")
def store(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("gpu") / "s.zarr"
    synthesize(out, SynthParams(n_cells=2000, n_peaks=5000, n_clusters=4, seed=2), chunk_rows=250, client=client,
               progress=False)
    return out


def test_cuda_training_matches_labels(store, tmp_path):
    from scatac_dist.models import SCALE
    from scatac_dist.store import open_atlas
    from scatac_dist.tl.metrics import ari

    m = SCALE(n_clusters=4, quick=True, device="cuda", max_iter=1500, batch_size=128, min_reads=1,
              progress=False).fit(store)
    a = open_atlas(store)
    used = a.obs["scale_used"].to_numpy(bool)
    assert m.summary_["steps"] > 0
    assert ari(a.obs["celltype"].to_numpy()[used], a.obs["scale_kmeans"][used]) > 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs two CUDA devices")
def test_nccl_ddp_ranks_agree(store, tmp_path):
    from scatac_dist.models.scale_training import train_rank as _train_rank
    from tests.test_train_ddp import _spec

    spec = _spec(store, tmp_path, 60, patience=1000)
    spec["train"]["device"] = "cuda"
    spec["chunk_rows"] = 250
    launch(_train_rank, (spec,), 2)
    r0 = torch.load(tmp_path / "out.rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "out.rank1.pt", weights_only=False)
    for k, v in r0["module"].items():
        assert np.array_equal(v.numpy(), r1["module"][k].numpy()), k
