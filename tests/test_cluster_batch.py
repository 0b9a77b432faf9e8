"""Batch-cluster settings, security defaults, TLS and run monitoring, without a batch system.

The SLURM runs themselves are in tests/test_slurm.py (a real SLURM). No PBS server can run
here: the PBS job script `--cluster pbs` produces, and the PBS recipes of deploy/pbs/, are
checked for their directives and the worker command line, not submitted.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO

BIN = Path(sys.executable).parent
CLI = str(BIN / "scatac-dist")


def _cli(*args, env=None, timeout=300):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- job scripts (PBS: no server here, so the script is what can be checked) ----------------------

def test_pbs_job_script_has_the_directives_and_the_worker_command():
    r = _cli("--cluster", "pbs", "--queue", "workq", "--account", "proj7", "--walltime", "02:30:00",
             "--job-cores", "4", "--job-memory", "16GiB", "job-script")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "#PBS -q workq" in lines and "#PBS -A proj7" in lines
    assert "#PBS -l select=1:ncpus=4:mem=16GB" in lines and "#PBS -l walltime=02:30:00" in lines
    assert any(ln.startswith("#PBS -N scatacw-") for ln in lines)
    worker = next(ln for ln in lines if "distributed.cli.dask_worker" in ln)
    # 4 worker processes of 1 thread each, the job's memory split between them, this interpreter
    assert worker.startswith(sys.executable) and "--nworkers 4" in worker and "--nthreads 1" in worker
    assert "--memory-limit 4.00GiB" in worker and "tcp://" in worker


def test_slurm_job_script_follows_the_config_and_the_flags(tmp_path):
    cfg = tmp_path / "site.yaml"
    cfg.write_text("scatac-dist:\n  cluster:\n    jobqueue:\n      job-extra-directives: ['--constraint=skylake']\n"
                   "      job-script-prologue: ['module load python/3.11']\n      local-directory: /scratch/me\n")
    r = _cli("--cluster", "slurm", "--queue", "short", "--walltime", "00:45:00", "--job-cores", "2", "job-script",
             env={"DASK_CONFIG": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ("#SBATCH -p short", "#SBATCH -t 00:45:00", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=4G",
                 "#SBATCH --constraint=skylake", "module load python/3.11"):
        assert line in out.splitlines(), (line, out)
    assert "--local-directory /scratch/me" in out and "--nworkers 2" in out


def test_pbs_and_slurm_recipes_parse_and_name_their_nodes():
    for path in [*(REPO / "deploy/slurm").glob("*.sbatch"), *(REPO / "deploy/pbs").glob("*.pbs")]:
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        if path.suffix == ".pbs":
            assert "#PBS -l select=" in text and "#PBS -l walltime=" in text and "PBS_NODEFILE" in text
        else:
            assert "#SBATCH --time=" in text and ("srun" in text or "--cluster slurm" in text)
    scale = (REPO / "deploy/slurm/scale.sbatch").read_text()
    assert "#SBATCH --requeue" in scale and "--resume auto" in scale and "scontrol show hostnames" in scale


# -- bad input -----------------------------------------------------------------------------------

def test_batch_cluster_errors_name_the_problem_and_the_fix(tmp_path):
    from scatac_dist.cluster import get_client
    from scatac_dist.errors import ClusterError

    store = tmp_path / "x.zarr"  # never written: each error comes before any work
    # no slurm commands on PATH
    r = _cli("--cluster", "slurm", "synth", "-o", str(store), env={"PATH": str(tmp_path / "empty")})
    assert not store.exists()
    assert r.returncode == 2 and "sbatch" in r.stderr and "not found on PATH" in r.stderr and "Fix:" in r.stderr
    # a cluster type that does not exist: the CLI's choice, and the library's error
    r = _cli("--cluster", "k8s-typo", "run", str(store))
    assert r.returncode == 2 and "'k8s-typo' is not one of 'local', 'slurm', 'pbs'" in r.stderr
    with pytest.raises(ClusterError, match="cluster type 'lsf' does not exist.*Fix"):
        get_client(cluster="lsf")
    # a walltime that is not one
    r = _cli("--cluster", "slurm", "--walltime", "90min", "job-script")
    assert r.returncode == 2 and "walltime '90min' is not a batch time limit" in r.stderr and "HH:MM:SS" in r.stderr
    r = _cli("--cluster", "slurm", "--adapt", "4:2", "job-script")
    assert r.returncode == 2 and "--adapt '4:2'" in r.stderr
    # --scheduler and --cluster slurm both choose where workers run
    with pytest.raises(ClusterError, match="both choose"):
        get_client("tcp://127.0.0.1:1", cluster="slurm")


def test_tls_certificate_missing_is_refused(tmp_path):
    r = _cli("--scheduler", "tls://127.0.0.1:1", "synth", "-o", str(tmp_path / "x.zarr"))
    assert r.returncode == 2 and "no TLS certificate is configured" in r.stderr and "--tls-ca-file" in r.stderr
    r = _cli("--scheduler", "tls://127.0.0.1:1", "--tls-ca-file", str(tmp_path / "ca.pem"), "--tls-cert",
             str(tmp_path / "cert.pem"), "synth", "-o", str(tmp_path / "x.zarr"))
    assert r.returncode == 2 and f"TLS CA certificate {tmp_path / 'ca.pem'} does not exist" in r.stderr


# -- TLS with a temporary certificate ------------------------------------------------------------

def _write_ca_and_cert(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signed (for 127.0.0.1), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key():
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    ca_key, cert_key = key(), key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask")]))
            .issuer_name(ca_name).public_key(cert_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(cert_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return paths


def test_tls_scheduler_accepts_its_certificate_and_refuses_others(tmp_path):
    """A scheduler and a worker that speak only TLS: the CLI with the certificate runs a
    command on them; without it, or with one from another CA, it is refused with a clear error."""
    ca, cert, key = _write_ca_and_cert(tmp_path / "good", "site")
    ca2, cert2, key2 = _write_ca_and_cert(tmp_path / "other", "stranger")
    port = _free_port()
    address = f"tls://127.0.0.1:{port}"
    tls = ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sched = subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--protocol",
                              "tls", "--no-dashboard", *tls], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env)
    worker = subprocess.Popen([BIN / "dask", "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                               "--memory-limit", "2GiB", "--local-directory", str(tmp_path / "w"), *tls],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        # the worker must have joined before the CLI counts workers (on a loaded machine it can
        # start after the CLI connects): wait for it over TLS with the same certificate
        from distributed import Client
        from distributed.security import Security

        sec = Security(tls_ca_file=str(ca), tls_client_cert=str(cert), tls_client_key=str(key),
                       require_encryption=True)
        with Client(address, security=sec, timeout="120s") as c:
            c.wait_for_workers(1, timeout=120)
        store = tmp_path / "s.zarr"
        r = _cli("--scheduler", address, *tls, "--no-progress", "synth", "-o", str(store), "--cells", "400",
                 "--peaks", "800", "--clusters", "3", timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"Dask: {address}, 1 workers" in r.stderr and (store / "X").is_dir()
        r = _cli("--scheduler", address, "synth", "-o", str(tmp_path / "t.zarr"))
        assert r.returncode == 2 and "no TLS certificate is configured" in r.stderr
        r = _cli("--scheduler", address, "--tls-ca-file", str(ca2), "--tls-cert", str(cert2), "--tls-key", str(key2),
                 "synth", "-o", str(tmp_path / "u.zarr"), env={"DASK_SCATAC_DIST__CLUSTER__CONNECT_TIMEOUT": "5s"})
        assert r.returncode == 2 and f"Could not reach the Dask scheduler at {address}" in r.stderr
        assert "TLS handshake" in r.stderr and not (tmp_path / "u.zarr").exists()
        # plain TCP to the TLS port is refused too
        r = _cli("--scheduler", f"tcp://127.0.0.1:{port}", "synth", "-o", str(tmp_path / "v.zarr"),
                 env={"DASK_SCATAC_DIST__CLUSTER__CONNECT_TIMEOUT": "5s"})
        assert r.returncode == 2 and "Could not reach" in r.stderr
    finally:
        for p in (worker, sched):
            p.terminate()
            p.wait(timeout=30)


# -- security defaults and the Prometheus endpoint ----------------------------------------------

def test_local_cluster_and_dashboard_bind_to_loopback():
    import psutil

    from scatac_dist.cluster import close_client, get_client

    client = get_client(n_workers=1, dashboard_address=None)
    try:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert all(a.startswith("tcp://127.0.0.1:") for a in client.scheduler_info()["workers"])
        port = int(client.dashboard_link.split(":")[2].split("/")[0])
        listening = [c for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        on_port = [c.laddr.ip for c in listening if c.laddr.port == port]
        assert on_port and set(on_port) <= {"127.0.0.1"}, on_port
    finally:
        close_client(client)


def test_prometheus_metrics_are_served_during_a_run(tmp_path):
    """The scheduler's /metrics endpoint (prometheus-client) answers while a pipeline runs."""
    port = _free_port()
    env = {"DASK_SCATAC_DIST__CLUSTER__DASHBOARD_ADDRESS": f"127.0.0.1:{port}"}
    store = tmp_path / "s.zarr"
    assert _cli("--workers", "1", "synth", "-o", str(store), "--cells", "2000", "--peaks", "4000").returncode == 0
    p = subprocess.Popen([CLI, "--workers", "2", "--no-progress", "run", str(store)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    seen = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and not seen:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.3)
                continue
            workers = [float(ln.split()[-1]) for ln in body.splitlines()
                       if ln.startswith("dask_scheduler_workers{")]
            if workers and sum(workers) > 0:  # read while the run's workers are up
                seen.append(body)
    finally:
        _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert seen, "no /metrics answer while the run went"
    assert "dask_scheduler_tasks" in seen[0] and "dask_scheduler_clients" in seen[0]


# -- the run monitor -----------------------------------------------------------------------------

def test_run_log_counts_tasks_memory_transfer_and_lost_workers(tmp_path):
    """Per stage: the exact number of tasks run, a worker's peak memory at least what a task
    held, bytes transferred between workers, a worker killed and replaced; a report per stage."""
    import dask.array as da
    import numpy as np

    from scatac_dist.cluster import close_client, get_client
    from scatac_dist.cluster.monitor import RunLog, summary_markdown

    client = get_client(n_workers=2, memory_limit="2GiB", dashboard_address=None)
    try:
        log = RunLog(client, report_dir=tmp_path / "reports")
        with log.stage("tasks"):
            assert sum(client.gather(client.map(lambda i: i * i, range(37)))) == sum(i * i for i in range(37))

        def hold(n):
            a = np.ones(n, dtype=np.uint8)
            time.sleep(2.5)  # longer than two heartbeats
            return int(a[-1])

        with log.stage("memory"):
            assert client.submit(hold, 400 * 2**20, pure=False).result() == 1
        with log.stage("transfer"):
            x = da.random.random((4000, 2000), chunks=(500, 2000))
            assert client.compute((x @ x.T).sum()).result() > 0  # on this client, whatever else runs
        with log.stage("lost"):
            victim = list(client.scheduler_info()["workers"])[0]
            os.kill(client.run(os.getpid, workers=[victim])[victim], 9)  # the nanny starts a new one
            client.wait_for_workers(2, timeout=180)  # generous: the restart shares 2 cores with the tests
            time.sleep(1)
        with pytest.raises(ZeroDivisionError), log.stage("failing"):
            client.submit(lambda: 1 / 0).result()
        summary = log.summary(status="done")
    finally:
        close_client(client)
    st = {s["stage"]: s for s in summary["stages"]}
    assert st["tasks"]["tasks"] == 37 and st["tasks"]["status"] == "done"
    assert max(st["memory"]["peak_memory_per_worker"].values()) >= 400 * 2**20
    assert st["transfer"]["bytes_transferred"] > 1_000_000 and st["transfer"]["tasks"] > 16, summary["stages"]
    assert len(st["lost"]["workers_lost"]) == 1 and len(st["lost"]["workers_joined"]) == 1
    assert st["failing"]["status"] == "failed" and st["failing"]["tasks_erred"] == 1
    assert summary["totals"]["tasks"] == sum(s["tasks"] for s in summary["stages"])
    reports = sorted(p.name for p in (tmp_path / "reports").iterdir())
    assert reports[:3] == ["01-tasks.html", "02-memory.html", "03-transfer.html"]
    md = summary_markdown(summary)
    assert "| transfer | done |" in md and "| failing | failed |" in md
    json.dumps(summary)  # storable as it is


def test_run_summary_is_written_into_the_store_and_beside_it(tmp_path):
    store = tmp_path / "s.zarr"
    assert _cli("--workers", "1", "synth", "-o", str(store), "--cells", "1500", "--peaks", "3000").returncode == 0
    r = _cli("--workers", "2", "--no-progress", "--performance-report-dir", str(tmp_path / "rep"), "run", str(store))
    assert r.returncode == 0, r.stderr[-2000:]
    from scatac_dist.store import open_atlas

    a = open_atlas(store)
    runs = list(a.runs())
    assert len(runs) == 2  # synth's and run's
    assert (tmp_path / f"s.zarr.run-{runs[0]}.md").is_file()
    summary = a.runs()[runs[-1]]
    names = [s["stage"] for s in summary["stages"]]
    assert names[:5] == ["qc", "filter_cells", "select_features", "tfidf", "lsi"] and "leiden" in names
    assert summary["status"] == "done" and summary["totals"]["tasks"] > 0
    assert (tmp_path / f"s.zarr.run-{runs[-1]}.md").read_text().startswith(f"# scatac-dist run {runs[-1]}")
    assert len(list((tmp_path / "rep").glob("*.html"))) == len(names)
    assert "dashboard: http://127.0.0.1:" in r.stderr
