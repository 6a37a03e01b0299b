"""`rtmanager serve` freezes the heap it built before start-up begins."""

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

    def __init__(self, settings: Settings) -> None:
        self.startup_failed = threading.Event()
        self.startup_error: Exception | None = None

    def begin_start_up(self) -> None:
        StartsAndFails.frozen_at_start_up = gc.get_freeze_count()
        self.startup_error = RuntimeError("stops here")
        self.startup_failed.set()

    def shutdown(self) -> bool:
        return True


def _raise_exit(code: int) -> NoReturn:
    raise SystemExit(code)


def test_serve_freezes_what_it_built_before_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rtmanager.app.Application", StartsAndFails)
    monkeypatch.setattr(cli, "_exit_now", _raise_exit)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit):
            cli._serve(cast(Settings, object()))
    finally:
        gc.unfreeze()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    frozen = StartsAndFails.frozen_at_start_up
    assert frozen is not None and frozen > 1000
