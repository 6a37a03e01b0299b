"""The `rtmanager` command: serve, migrate, ctl."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from rtmanager import ctl
from rtmanager.config import ConfigError, Settings, load_settings
from rtmanager.logs import configure_logging

log = logging.getLogger("rtmanager")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "ctl":  # a client: needs no server settings
        return ctl.run(args)
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"rtmanager: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    handler = {"serve": _serve, "migrate": _migrate}[args.command]
    return handler(settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtmanager",
        description="Galaxy Runtime Manager. Settings come from RTMANAGER_* variables.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the gRPC server with every worker")
    commands.add_parser("migrate", help="apply pending database migrations")
    ctl.add_ctl_parser(commands)
    return parser


def _migrate(settings: Settings) -> int:
    from rtmanager.adapters.postgres.migrations import MigrationError, apply_migrations
    from rtmanager.domain.errors import ServiceUnavailable

    try:
        applied = apply_migrations(
            settings.postgres_dsn,
            settings.postgres_schema,
            settings.migrations_dir,
            cluster=settings.cluster,
        )
    except (MigrationError, ServiceUnavailable, OSError, ValueError) as error:
        print(f"rtmanager migrate: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))} to {settings.postgres_schema}")
    else:
        print(f"schema {settings.postgres_schema} is up to date")
    return EXIT_OK


def _serve(settings: Settings) -> int:
    from rtmanager.adapters.postgres.migrations import SchemaVersionError
    from rtmanager.api.auth import AuthConfigError
    from rtmanager.api.server import BindError
    from rtmanager.app import Application, StartupError

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        app = Application(settings)
    except (StartupError, AuthConfigError) as error:
        print(f"rtmanager serve: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BindError as error:
        print(f"rtmanager serve: {error}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        app.wait_for_schema(stop)
    except SchemaVersionError as error:
        print(f"rtmanager serve: {error}", file=sys.stderr)
        app.close()
        return EXIT_FAILURE
    if stop.is_set():
        app.close()
        return EXIT_OK
    if app.start(stop):
        stop.wait()
    app.shutdown()
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
