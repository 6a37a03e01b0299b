"""`rtmanager health`: the server's gRPC health check as a command.

For an exec probe or a container `HEALTHCHECK`: exits 0 when the server
answers SERVING, 1 when it answers anything else (NOT_SERVING while it
starts up or drains, or an unknown service name), 7 when it cannot be
reached within the timeout, 2 on bad arguments. The health service needs
no token. It prints one line saying what it found.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 7

_WILDCARD_HOSTS = {"", "0.0.0.0", "[::]", "::"}


def add_health_parser(commands: Any) -> None:
    """Add the `health` subcommand to the `rtmanager` command's subparsers."""
    parser = commands.add_parser(
        "health",
        help="check the server's gRPC health (exit 0 serving, 1 not, 7 unreachable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--address",
        help="server address (default: $RTMANAGER_GRPC_ADDR, a wildcard host as 127.0.0.1)",
    )
    parser.add_argument("--service", default="", help="service name to check (default: all)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--tls-ca", type=Path, help="CA bundle; switches to TLS")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    parser.add_argument("--tls-key", type=Path, help="client key (mTLS)")
    parser.add_argument("--tls-server-name", help="name to verify the server's certificate against")


def probe_address(environ: dict[str, str] | None = None) -> str:
    """The address to probe: the server's listen address, a wildcard host made loopback."""
    address = (environ if environ is not None else os.environ).get(
        "RTMANAGER_GRPC_ADDR", "127.0.0.1:50051"
    )
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in _WILDCARD_HOSTS else address


def run(args: argparse.Namespace) -> int:
    """Run one health check; print what it found; return the exit code."""
    if args.timeout <= 0:
        print("rtmanager health: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    if bool(args.tls_cert) != bool(args.tls_key):
        print("rtmanager health: --tls-cert and --tls-key go together", file=sys.stderr)
        return EXIT_USAGE
    address = args.address or probe_address()
    try:
        channel = _channel(address, args)
    except OSError as error:
        print(f"rtmanager health: {error}", file=sys.stderr)
        return EXIT_USAGE
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            code = error.code()
            if code is grpc.StatusCode.NOT_FOUND:
                print(f"{address}: unknown service {args.service!r}")
                return EXIT_NOT_SERVING
            print(f"{address}: unreachable: {code.name}: {error.details()}")
            return EXIT_UNREACHABLE
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return (
        EXIT_SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SERVING
    )


def _channel(address: str, args: argparse.Namespace) -> grpc.Channel:
    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
        private_key=args.tls_key.read_bytes() if args.tls_key else None,
        certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
    )
    options = (
        [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    )
    return grpc.secure_channel(address, credentials, options=options)
