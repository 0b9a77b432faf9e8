"""The batch examples in deploy/ parse (YAML, bash) and run the command the docs say they do.
No SLURM GPU node or Kubernetes cluster exists here, so this is all that can be checked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_k8s_scale_job_is_a_torchrun_job():
    job = yaml.safe_load((DEPLOY / "k8s" / "scale-job.yaml").read_text())
    assert job["kind"] == "Job"
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][0] == "torchrun" and c["args"][1:3] == ["--no-progress", "scale"]


def test_sbatch_script_parses_and_uses_srun():
    script = DEPLOY / "slurm" / "scale.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "srun scatac-dist" in script.read_text()
