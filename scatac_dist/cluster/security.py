"""TLS between the client, the scheduler and the workers (``distributed.Security``).

Certificate paths come from ``scatac-dist.cluster.tls`` of the Dask config (``ca-file``,
``cert``, ``key``), from the ``--tls-*`` options, or else from Dask's own
``distributed.comm.tls.*`` settings. A ``tls://`` scheduler address needs them; a local cluster
and the dashboard bind to 127.0.0.1 unless asked otherwise, so they need none.
"""

from __future__ import annotations

import os

from .. import _config
from ..errors import ClusterError

__all__ = ["tls_security", "needs_tls"]


def needs_tls(address: str | None) -> bool:
    """Whether ``address`` names a TLS scheduler (``tls://HOST:PORT``)."""
    return bool(address) and str(address).startswith("tls://")


def tls_security(ca_file: str | None = None, cert: str | None = None, key: str | None = None, *,
                 required: bool = False):
    """A :class:`distributed.Security` from the given paths, the config, or Dask's own TLS config.

    Returns ``None`` when no certificate is configured anywhere and ``required`` is false.

    Raises
    ------
    ClusterError
        When ``required`` (a ``tls://`` address) and no certificate is configured, or a
        certificate file named does not exist or cannot be read.
    """
    from distributed import Security

    conf = _config.get("cluster.tls") or {}
    ca_file = ca_file or conf.get("ca-file")
    cert = cert or conf.get("cert")
    key = key or conf.get("key")
    if not (ca_file or cert):
        dask_own = Security()  # distributed.comm.tls.* (a site's existing Dask TLS settings)
        if dask_own.tls_ca_file and dask_own.tls_client_cert:
            return dask_own
        if required:
            raise ClusterError(
                "the scheduler address is tls://, but no TLS certificate is configured, so the scheduler "
                "would refuse this client. Fix: pass --tls-ca-file CA.pem --tls-cert CERT.pem [--tls-key "
                "KEY.pem] (or set scatac-dist.cluster.tls.ca-file/cert/key in the Dask config) with the "
                "certificate the cluster's administrator issued for clients.")
        return None
    for what, path in (("CA certificate", ca_file), ("certificate", cert), ("key", key)):
        if path and not os.access(path, os.R_OK):
            raise ClusterError(f"TLS {what} {path} does not exist or cannot be read. Fix: give the path of "
                               f"the {what} file (PEM) to --tls-{'ca-file' if what.startswith('CA') else what.split()[0]}"
                               " or in scatac-dist.cluster.tls.")
    if not (ca_file and cert):
        raise ClusterError("TLS needs both a CA certificate and this client's certificate. Fix: pass "
                           "--tls-ca-file and --tls-cert (and --tls-key if the key is a file of its own).")
    return Security(tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key,
                    tls_worker_cert=cert, tls_worker_key=key, tls_scheduler_cert=cert,
                    tls_scheduler_key=key, require_encryption=True)
