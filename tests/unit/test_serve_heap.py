"""`rtmanager serve` settles the garbage collector before start-up begins."""

from __future__ import annotations

import gc
import signal
import threading
from typing import NoReturn, cast

import pytest

from rtmanager import cli
from rtmanager.config import Settings


class StartsAndFails:
    """An application whose start-up notes the frozen heap, then fails at once."""

    frozen_at_start_up: int | None = None
    threshold_at_start_up: tuple[int, int, int] | None = None

    def __init__(self, settings: Settings) -> None:
        self.startup_failed = threading.Event()
        self.startup_error: Exception | None = None

    def begin_start_up(self) -> None:
        StartsAndFails.frozen_at_start_up = gc.get_freeze_count()
        StartsAndFails.threshold_at_start_up = gc.get_threshold()
        self.startup_error = RuntimeError("stops here")
        self.startup_failed.set()

    def shutdown(self) -> bool:
        return True


def _raise_exit(code: int) -> NoReturn:
    raise SystemExit(code)


def test_serve_freezes_what_it_built_and_collects_the_young_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("rtmanager.app.Application", StartsAndFails)
    monkeypatch.setattr(cli, "_exit_now", _raise_exit)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    threshold = gc.get_threshold()
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit):
            cli._serve(cast(Settings, object()))
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    frozen = StartsAndFails.frozen_at_start_up
    assert frozen is not None and frozen > 1000
    assert StartsAndFails.threshold_at_start_up == (10_000, threshold[1], threshold[2])
