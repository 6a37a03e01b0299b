"""The `rtmanager` command: serve, migrate, ctl, health."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from rtmanager import probe
from rtmanager.config import ConfigError, Settings, load_settings
from rtmanager.logs import configure_logging

log = logging.getLogger("rtmanager")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_SHUTDOWN_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# The longest the main thread waits without returning to the interpreter,
# should a signal ever reach another thread: it is acted on within this.
_SIGNAL_POLL_SECONDS = 0.2
# Net allocations between the collector's young-generation passes while
# serving (Python's default is 700; see `_settle_collector`).
_YOUNG_GENERATION_THRESHOLD = 10_000


CTL_HELP = "call a running server: start, stop, get, list, ops, explain, ... (a human client)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ctl"]:
        # A client: needs no server settings, and its modules (the typed
        # client, protobuf's JSON rendering) are loaded for it alone, not
        # into a server.
        from rtmanager import ctl

        ctl_parser = ctl.build_parser()
        return ctl.run(ctl_parser.parse_args(argv[1:]), parser=ctl_parser)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "health":  # a probe: needs only the address
        return probe.run(args)
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
    # Listed here; `main` hands `rtmanager ctl ...` to `ctl.build_parser`.
    commands.add_parser("ctl", help=CTL_HELP)
    probe.add_health_parser(commands)
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
    """Run the server until SIGTERM or SIGINT, then drain (SPEC §5 Shutdown).

    Python runs signal handlers only in the main thread, between bytecodes.
    So the main thread does nothing that blocks: start-up runs on a thread of
    its own, and the main thread waits in short timed waits. The signals are
    also blocked in every other thread (threads inherit the mask of the
    thread that creates them, and all of them descend from threads created
    while it was blocked here), so the kernel hands them to the main thread,
    interrupting its wait at once.
    """
    from rtmanager.api.auth import AuthConfigError
    from rtmanager.api.server import BindError
    from rtmanager.app import Application, StartupError

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.info("received %s again; already draining", name)
            return
        log.info("received %s", name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SHUTDOWN_SIGNALS)
    try:
        try:
            app = Application(settings)
        except (StartupError, AuthConfigError) as error:
            print(f"rtmanager serve: {error}", file=sys.stderr)
            return EXIT_USAGE
        except BindError as error:
            print(f"rtmanager serve: {error}", file=sys.stderr)
            return EXIT_FAILURE
        _settle_collector()
        app.begin_start_up()
    finally:
        # A signal that came meanwhile is pending and is delivered here.
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    while not stop.wait(_SIGNAL_POLL_SECONDS) and not app.startup_failed.is_set():
        pass
    clean = app.shutdown()
    if app.startup_error is not None:
        print(f"rtmanager serve: {app.startup_error}", file=sys.stderr)
    if not clean:
        # Threads still run work that may use the pools, and grpc's
        # non-daemon server threads would hold the interpreter's exit:
        # leave now, as the orchestrator's SIGKILL would.
        _exit_now(EXIT_FAILURE)
    # Everything is closed. The interpreter's own teardown (joining idle
    # server threads, finalizing grpc and OpenTelemetry modules) does
    # nothing more but can take a second on a loaded machine.
    _exit_now(EXIT_OK if app.startup_error is None else EXIT_FAILURE)


def _settle_collector() -> None:
    """Keep the cyclic garbage collector's pauses short while serving.

    Two measured causes of long pauses (each a full collection, which holds
    the GIL and so stalls every RPC and watch in flight):

    - The modules, settings and adapters built so far are most of the heap,
      and each full collection walked them all: 40-105 ms with 1000
      watchers. They live as long as the process, so they are collected
      once here and then frozen (`gc.freeze`): never walked again.
    - Python's default young-generation threshold (700 net allocations)
      collected so often while an event went out to 1000 watchers that the
      objects of the calls in flight kept being promoted: one run of the
      fan-out benchmark made 20 full collections of 27-54 ms even with the
      heap frozen. Collecting the young generation every
      `_YOUNG_GENERATION_THRESHOLD` allocations instead, the same run made
      none.

    What start-up and the RPCs create later is collected as usual.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_YOUNG_GENERATION_THRESHOLD, middle, old)


def _exit_now(code: int) -> NoReturn:
    """End the process at once, after flushing logs and standard streams."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
