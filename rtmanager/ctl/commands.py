"""The subcommands of `rtmanager ctl` and the parser that reaches them: one
handler per RPC, each one call of the typed client whose answer it hands to
`Output`; the global connection and output options; and the argument types
that reject a bad value while parsing, so it exits 2 before any connection
is made.

The handlers live beside the parser because the parser is what binds each
subcommand to its handler (`ctl_handler` on the parsed arguments, the one
`run` calls).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from rtmanager.client import RuntimeManagerClient
from rtmanager.ctl.connection import DEFAULT_ADDR, DEFAULT_TIMEOUT
from rtmanager.ctl.errors import EPILOG, UsageError
from rtmanager.ctl.render import (
    Output,
    explanation_text,
    message_to_json,
    reconcile_text,
    to_json,
    watch_line,
)
from rtmanager.domain.operation import OpKind, OpSource, Outcome, StopReason
from rtmanager.domain.runtime import RuntimeStatus
from rtmanager.ports import Page

PROG = "rtmanager ctl"


# --------------------------------------------------------------------------
# Subcommands


def _start(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    out.record(client.start_runtime(args.game, args.image, source_ref=args.source_ref))


def _stop(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    reason = StopReason(args.reason)
    out.record(client.stop_runtime(args.game, reason=reason, source_ref=args.source_ref))


def _restart(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    out.record(client.restart_runtime(args.game, source_ref=args.source_ref))


def _patch(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    out.record(client.patch_runtime(args.game, args.image, source_ref=args.source_ref))


def _get(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    out.record(client.get_runtime(args.game), full=True)


def _list(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    status = RuntimeStatus(args.status) if args.status else None
    if args.all:
        records = client.iter_runtimes(
            status=status, page_size=args.page_size, page_token=args.page_token
        )
        out.records(Page(list(records)))
    else:
        out.records(
            client.list_runtimes(
                status=status, page_size=args.page_size, page_token=args.page_token
            )
        )


def _ops(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    if args.since and args.until and args.since >= args.until:
        raise UsageError("--since must be before --until")
    page = client.list_operations(
        game_id=args.game or "",
        op_kind=OpKind(args.kind) if args.kind else None,
        op_source=OpSource(args.source) if args.source else None,
        outcome=Outcome(args.outcome) if args.outcome else None,
        since=args.since,
        until=args.until,
        page_size=args.limit,
        page_token=args.page_token,
    )
    out.operations(page)


def _cleanup(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    out.record(client.cleanup_runtime(args.game, force=args.force, source_ref=args.source_ref))


def _reconcile(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    reply = client.reconcile(dry_run=args.dry_run)
    if out.json:
        out.emit_json(message_to_json(reply))
    else:
        out.emit(reconcile_text(reply))


def _explain(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    explanation = client.explain_runtime(args.game, operations=args.limit)
    if out.json:
        out.emit_json(to_json(explanation))
    else:
        out.emit(explanation_text(explanation))


def _watch(client: RuntimeManagerClient, args: argparse.Namespace, out: Output) -> None:
    stream = client.watch_runtimes(
        game_ids=args.game or [],
        statuses=[RuntimeStatus(status) for status in args.status or []],
        since=args.since,
        initial_snapshot=args.snapshot,
    )
    try:
        for message in stream:
            if out.json:
                out.emit_json(message_to_json(message), indent=None)
                continue
            line = watch_line(message)
            if line is not None:
                out.emit(line)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends: a success


Handler = Callable[[RuntimeManagerClient, argparse.Namespace, Output], None]


# --------------------------------------------------------------------------
# Parsing


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def parse_timestamp(text: str) -> datetime:
    """An ISO-8601 timestamp (or date); one without an offset is taken as UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 timestamp (e.g. 2024-05-01T12:00:00Z)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _add_connection_options(parser: argparse.ArgumentParser, *, nested: bool) -> None:
    """The global options; on subcommands they default to 'not given' (SUPPRESS)."""

    def option(*names: str, default: object, **kwargs: Any) -> None:
        group.add_argument(*names, default=argparse.SUPPRESS if nested else default, **kwargs)

    group = parser.add_argument_group("connection and output")
    option(
        "--addr",
        default=None,
        metavar="HOST:PORT",
        help="server address (default: $RTMANAGER_CTL_ADDR, else $RTMANAGER_GRPC_ADDR, "
        f"else {DEFAULT_ADDR})",
    )
    option("--token", default=None, help="bearer token (default: $RTMANAGER_CTL_TOKEN)")
    option("--tls-ca", default=None, metavar="FILE", help="CA bundle; switches to TLS")
    option(
        "--tls-cert",
        default=None,
        metavar="FILE",
        help="client certificate for mutual TLS (with --tls-key)",
    )
    option(
        "--tls-key",
        default=None,
        metavar="FILE",
        help="client private key for mutual TLS (with --tls-cert)",
    )
    option(
        "--timeout",
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        type=_positive_float,
        help=f"deadline of each call (default: {DEFAULT_TIMEOUT:g}; watch is unbounded)",
    )
    option("--json", default=False, action="store_true", help="print JSON instead of tables")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the global options and the subcommands of `rtmanager ctl` to `parser`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    _add_connection_options(parser, nested=False)
    commands = parser.add_subparsers(dest="ctl_command", metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(ctl_handler=handler)
        _add_connection_options(sub, nested=True)
        return sub

    def game(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("game", metavar="GAME", help="game id")

    def source_ref(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--source-ref", default="", metavar="REF", help="caller reference for the log"
        )

    def page_options(sub: argparse.ArgumentParser, size: str, size_help: str) -> None:
        sub.add_argument(size, type=_non_negative_int, default=0, metavar="N", help=size_help)
        sub.add_argument("--page-token", default="", metavar="T", help="continue a listing")

    sub = command("start", _start, "start (or confirm) a game's engine")
    game(sub)
    sub.add_argument("image", metavar="IMAGE", help="engine image, e.g. galaxy/engine:1.4.2")
    source_ref(sub)

    sub = command("stop", _stop, "stop a game's engine gracefully")
    game(sub)
    sub.add_argument(
        "--reason",
        choices=[reason.value for reason in StopReason],
        default=StopReason.ADMIN_REQUEST.value,
        help="why (default: admin_request)",
    )
    source_ref(sub)

    sub = command("restart", _restart, "recreate a game's engine with its current image")
    game(sub)
    source_ref(sub)

    sub = command("patch", _patch, "recreate a game's engine with a semver patch image")
    game(sub)
    sub.add_argument("image", metavar="IMAGE", help="same repository and major.minor")
    source_ref(sub)

    sub = command("get", _get, "show one game's runtime record")
    game(sub)

    sub = command("list", _list, "list runtime records, ordered by game id")
    sub.add_argument("--status", choices=[status.value for status in RuntimeStatus])
    page_options(sub, "--page-size", "records per page (default: the server's, 100)")
    sub.add_argument("--all", action="store_true", help="follow page tokens to the end")

    sub = command("ops", _ops, "list the operation log, newest first (admin)")
    sub.add_argument("--game", metavar="G", help="only this game")
    sub.add_argument("--kind", choices=[kind.value for kind in OpKind])
    sub.add_argument("--source", choices=[source.value for source in OpSource])
    sub.add_argument("--outcome", choices=[outcome.value for outcome in Outcome])
    sub.add_argument("--since", type=parse_timestamp, metavar="ISO8601", help="started at or after")
    sub.add_argument("--until", type=parse_timestamp, metavar="ISO8601", help="started before")
    page_options(sub, "--limit", "entries in this page (default: the server's, 100; at most 1000)")

    sub = command("cleanup", _cleanup, "remove a stopped game's container (admin)")
    game(sub)
    sub.add_argument("--force", action="store_true", help="stop a running engine first")
    source_ref(sub)

    sub = command("reconcile", _reconcile, "run a reconciliation pass now (admin)")
    sub.add_argument("--dry-run", action="store_true", help="only return the plan")

    sub = command(
        "explain",
        _explain,
        "what is known about a game: record, container, lease, Lobby jobs, operations (admin)",
    )
    game(sub)
    sub.add_argument(
        "--limit",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="operation-log entries to show (default: the server's, 20; at most 100)",
    )

    sub = command("watch", _watch, "stream runtime changes until interrupted")
    sub.add_argument("--game", action="append", metavar="G", help="only this game (repeatable)")
    sub.add_argument(
        "--status",
        action="append",
        choices=[status.value for status in RuntimeStatus],
        help="only records in this status after the change (repeatable)",
    )
    sub.add_argument("--since", default="", metavar="CURSOR", help="resume after this cursor")
    sub.add_argument("--snapshot", action="store_true", help="send the current records first")


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of `rtmanager ctl` (as `python -m rtmanager.ctl` uses it)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Call a running rtmanager server (a human client)."
    )
    configure_parser(parser)
    return parser
