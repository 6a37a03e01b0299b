"""Structured logging: JSON lines in production, readable text on a terminal."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from rtmanager.tracing import TraceFields

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(threadName)s"


def configure_logging(level: str, fmt: str) -> None:
    """Send every log record to stderr at `level`, as JSON or as text.

    Fields given through `extra=` (game_id, op_kind, ...) appear as JSON
    keys, and so do the current span's `trace_id` and `span_id` and a Lobby
    job's `job_id` and `stream` (`rtmanager.tracing`); text lines end with
    the trace and span ids.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceFields())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                _JSON_FIELDS,
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(_TextFormatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at warning unless debugging.
    for noisy in ("urllib3", "docker", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


class _TextFormatter(logging.Formatter):
    """The text format, with the trace and span ids of lines written in a span."""

    def format(self, record: logging.LogRecord) -> str:
        """The line, then `trace=… span=…` when the record has them."""
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        if trace_id is None:
            return line
        return f"{line} [trace={trace_id} span={getattr(record, 'span_id', '')}]"
