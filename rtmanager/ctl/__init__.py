"""`rtmanager ctl`: a human client of a running rtmanager server.

One subcommand per RPC, each a call of `rtmanager.client.RuntimeManagerClient`
(its channel, its typed errors, its paging)::

    rtmanager ctl start g1 galaxy/engine:1.4.2
    rtmanager ctl --json get g1
    rtmanager ctl ops --game g1 --limit 20
    rtmanager ctl explain g1

Output is a readable table by default; `--json` prints machine output
instead: records, operation-log entries and `explain`'s answer as objects
whose timestamps are ISO-8601 UTC strings, whose durations are seconds and
whose enum values are the lower-case strings the domain stores; listings as
an object holding the array and `next_page_token`; `reconcile` and `watch`
as the proto messages rendered by `google.protobuf.json_format` (`watch`
prints one object per line).

The connection comes from the global options, given after `ctl` (or after
the subcommand):
`--addr` (default $RTMANAGER_CTL_ADDR, else $RTMANAGER_GRPC_ADDR, else
127.0.0.1:50051), `--token` (default $RTMANAGER_CTL_TOKEN), `--tls-ca`,
`--tls-cert`, `--tls-key` (any of them switches to TLS; cert and key make it
mutual TLS), `--timeout` seconds per call (default 60; `watch` is not bounded
by it).

A failure prints `rtmanager ctl: <code>: <message>` on stderr, the code
being the stable error code (`not_found`, `service_unavailable`, ...), and
exits with the code `EXIT_CODES` gives the client's exception class
(`--help` lists them); usage errors exit 2, Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from rtmanager.client import RuntimeManagerClientError
from rtmanager.ctl.commands import PROG, Handler, build_parser
from rtmanager.ctl.connection import Connect, connect, connection_of
from rtmanager.ctl.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    error_label,
    exit_code_for,
)
from rtmanager.ctl.render import Output

# The package's face: `rtmanager.cli` calls `build_parser` and `run`,
# `python -m rtmanager.ctl` calls `main`.
__all__ = ["build_parser", "main", "run"]


def _fail(code: str, message: str) -> None:
    print(f"{PROG}: {code}: {message}", file=sys.stderr)


def run(
    args: argparse.Namespace,
    *,
    connect: Connect = connect,
    stdout: TextIO | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> int:
    """Run the parsed `ctl` command and return the exit code."""
    handler: Handler | None = getattr(args, "ctl_handler", None)
    if handler is None:
        (parser or build_parser()).print_help(sys.stderr)
        return EXIT_USAGE
    out = Output(json=args.json, stream=stdout or sys.stdout)
    try:
        client = connect(connection_of(args))
    except UsageError as error:
        _fail("usage", str(error))
        return EXIT_USAGE
    try:
        handler(client, args, out)
    except UsageError as error:
        _fail("usage", str(error))
        return EXIT_USAGE
    except RuntimeManagerClientError as error:
        _fail(error_label(error), error.message)
        return exit_code_for(error)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): silence the final flush.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.stream.fileno())
        return EXIT_FAILURE
    finally:
        client.close()
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None,
    *,
    connect: Connect = connect,
    stdout: TextIO | None = None,
) -> int:
    """Parse `argv` (without the leading `ctl`), run it, return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as leaving:  # --help (0) or a usage error (2)
        return leaving.code if isinstance(leaving.code, int) else EXIT_USAGE
    return run(args, connect=connect, stdout=stdout, parser=parser)
