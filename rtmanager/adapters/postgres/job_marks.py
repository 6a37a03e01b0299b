"""`JobMarkStore` on the `lobby_job_watermarks` table (migration 0003)."""

from __future__ import annotations

from datetime import UTC
from typing import Any, LiteralString

from psycopg.rows import dict_row

from rtmanager.adapters.postgres.pool import Connection, database_errors
from rtmanager.domain.errors import ErrorCode
from rtmanager.domain.jobs import JobKind, JobMark, LobbyJob
from rtmanager.domain.operation import Outcome

_SELECT: LiteralString = (
    "SELECT game_id, job_rank, job_stream, job_id, outcome, error_code, error_message,"
    " operation_id, applied_at FROM lobby_job_watermarks WHERE game_id = %s"
)
# The WHERE clause keeps a watermark from ever moving back, whoever writes.
_ADVANCE: LiteralString = (
    "INSERT INTO lobby_job_watermarks (game_id, job_ms, job_seq, job_rank, job_stream,"
    " job_id, outcome, error_code, error_message, operation_id, applied_at) VALUES"
    " (%(game_id)s, %(ms)s, %(seq)s, %(rank)s, %(stream)s, %(job_id)s, %(outcome)s,"
    " %(error_code)s, %(error_message)s, %(operation_id)s, %(applied_at)s)"
    " ON CONFLICT (game_id) DO UPDATE SET"
    " job_ms = EXCLUDED.job_ms, job_seq = EXCLUDED.job_seq, job_rank = EXCLUDED.job_rank,"
    " job_stream = EXCLUDED.job_stream, job_id = EXCLUDED.job_id,"
    " outcome = EXCLUDED.outcome, error_code = EXCLUDED.error_code,"
    " error_message = EXCLUDED.error_message, operation_id = EXCLUDED.operation_id,"
    " applied_at = EXCLUDED.applied_at"
    " WHERE (lobby_job_watermarks.job_ms, lobby_job_watermarks.job_seq,"
    " lobby_job_watermarks.job_rank) < (EXCLUDED.job_ms, EXCLUDED.job_seq, EXCLUDED.job_rank)"
)


class PostgresJobMarkStore:
    """Lobby job watermarks in the unit of work's transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get(self, game_id: str) -> JobMark | None:
        """The game's watermark, or None before its first Lobby job."""
        with (
            database_errors("read a Lobby job watermark"),
            self._conn.cursor(row_factory=dict_row) as cursor,
        ):
            row = cursor.execute(_SELECT, (game_id,)).fetchone()
        return _mark(row) if row is not None else None

    def advance(self, mark: JobMark) -> bool:
        """Make `mark` the watermark unless the stored one is as new or newer (then False)."""
        position = mark.job.position
        with database_errors("write a Lobby job watermark"):
            cursor = self._conn.execute(
                _ADVANCE,
                {
                    "game_id": mark.game_id,
                    "ms": position.ms,
                    "seq": position.seq,
                    "rank": position.rank,
                    "stream": mark.job.stream,
                    "job_id": mark.job.entry_id,
                    "outcome": str(mark.outcome),
                    "error_code": str(mark.error_code) if mark.error_code else None,
                    "error_message": mark.error_message or None,
                    "operation_id": mark.operation_id or None,
                    "applied_at": mark.applied_at,
                },
            )
        return cursor.rowcount == 1


def _mark(row: dict[str, Any]) -> JobMark:
    kind = JobKind.START if row["job_rank"] == 0 else JobKind.STOP
    code = row["error_code"]
    return JobMark(
        game_id=row["game_id"],
        job=LobbyJob(kind=kind, stream=row["job_stream"], entry_id=row["job_id"]),
        outcome=Outcome(row["outcome"]),
        applied_at=row["applied_at"].astimezone(UTC),
        error_code=ErrorCode(code) if code is not None else None,
        error_message=row["error_message"] or "",
        operation_id=row["operation_id"] or 0,
    )
