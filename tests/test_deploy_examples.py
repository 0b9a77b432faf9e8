"""The examples in deploy/ that cannot run here: the Kubernetes Job (no API server) parses and
runs the command the docs say, and the example config names only settings that exist. The
SLURM recipes run under a real SLURM in tests/test_slurm.py; the PBS ones are checked in
tests/test_cluster_batch.py."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_k8s_scale_job_is_a_torchrun_job():
    job = yaml.safe_load((DEPLOY / "k8s" / "scale-job.yaml").read_text())
    assert job["kind"] == "Job"
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][0] == "torchrun" and c["args"][1:3] == ["--no-progress", "scale"]


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
