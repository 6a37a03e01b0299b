"""UTC timestamps: every time the domain stores is timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def require_utc(name: str, value: datetime, error: type[ValueError]) -> None:
    """Raise `error` unless `value` is an aware datetime at UTC offset zero."""
    if not isinstance(value, datetime):
        raise error(f"{name} must be a datetime")
    if value.tzinfo is None or value.utcoffset() != timedelta(0):
        raise error(f"{name} must be a UTC timestamp")
