"""Where and how `rtmanager ctl` reaches the server: the global connection
options, with the environment behind their defaults, read into a
`Connection`, and `connect`, which makes the typed client of one. `run` and
`main` take `connect` as a parameter, so a test can hand them a stub.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rtmanager.client import ClientCredentials, RuntimeManagerClient
from rtmanager.ctl.errors import UsageError

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Connection:
    """Where and how to reach the server."""

    address: str
    token: str | None = None
    tls: ClientCredentials | None = None
    timeout: float = DEFAULT_TIMEOUT


def connect(connection: Connection) -> RuntimeManagerClient:
    """The typed client for `connection`."""
    return RuntimeManagerClient(
        connection.address,
        token=connection.token,
        tls=connection.tls,
        timeout=connection.timeout,
    )


Connect = Callable[[Connection], RuntimeManagerClient]


def _env_address() -> str:
    explicit = os.environ.get("RTMANAGER_CTL_ADDR", "").strip()
    if explicit:
        return explicit
    server = os.environ.get("RTMANAGER_GRPC_ADDR", "").strip()
    if not server:
        return DEFAULT_ADDR
    # The server's listen address; a wildcard host is reached on loopback.
    host, sep, port = server.rpartition(":")
    if sep and host in ("", "0.0.0.0", "[::]", "::"):
        return f"{'[::1]' if ':' in host else '127.0.0.1'}:{port}"
    return server


def _read(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"{option} {path}: {error.strerror or error}") from None


def connection_of(args: argparse.Namespace) -> Connection:
    """The connection the global options (and the environment) describe."""
    address = args.addr or _env_address()
    token = args.token if args.token is not None else os.environ.get("RTMANAGER_CTL_TOKEN")
    tls: ClientCredentials | None = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise UsageError("--tls-cert and --tls-key must be given together")
        tls = ClientCredentials(
            root_certificates=_read(args.tls_ca, "--tls-ca"),
            private_key=_read(args.tls_key, "--tls-key"),
            certificate_chain=_read(args.tls_cert, "--tls-cert"),
        )
    return Connection(address=address, token=token or None, tls=tls, timeout=args.timeout)
