"""The example config in deploy/ names only settings that exist. The SLURM recipes run under a
real SLURM in tests/test_slurm.py, the PBS ones are checked in tests/test_cluster_batch.py,
the Kubernetes manifests in tests/test_k8s.py and the image in tests/test_container.py."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and v:
            out |= _keys(v, prefix + k + ".")
    return out


def test_example_config_names_only_settings_that_exist():
    """A misspelt key in a site's config would be ignored without a word: the example holds none."""
    example = yaml.safe_load((DEPLOY / "scatac_dist.yaml").read_text())["scatac-dist"]
    defaults = yaml.safe_load((DEPLOY.parent / "scatac_dist" / "scatac_dist.yaml").read_text())["scatac-dist"]
    assert _keys(example) <= _keys(defaults), _keys(example) - _keys(defaults)
    assert "jobqueue" in example["cluster"] and "tls" in example["cluster"]
