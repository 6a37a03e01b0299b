"""Keyset pagination: page sizes and opaque page tokens.

A page token is the URL-safe base64 (unpadded) of a one-key JSON object
naming where the next page starts: `{"after_game_id": "..."}` for runtime
records, `{"before_id": 123}` for the operation log. Clients must treat it as
opaque; the store rejects anything it did not produce with `InvalidRequest`.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timedelta

from rtmanager.domain.errors import InvalidRequest
from rtmanager.domain.ids import is_valid_game_id

MIN_PAGE_SIZE = 1
MAX_PAGE_SIZE = 1000
_MAX_TOKEN_LENGTH = 256
_RECORDS_KEY = "after_game_id"
_OPERATIONS_KEY = "before_id"


def check_page_size(page_size: int) -> int:
    """Return `page_size` when it is within 1..1000; raise `InvalidRequest` otherwise."""
    if (
        not isinstance(page_size, int)
        or isinstance(page_size, bool)
        or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE
    ):
        raise InvalidRequest(
            f"page_size {page_size!r} is invalid: expected {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}",
            metadata={"field": "page_size"},
        )
    return page_size


def check_utc(name: str, value: datetime) -> datetime:
    """Return `value` when it is an aware UTC datetime; raise `InvalidRequest` otherwise."""
    if not isinstance(value, datetime) or value.utcoffset() != timedelta(0):
        raise InvalidRequest(f"{name} must be a UTC timestamp", metadata={"field": name})
    return value


def _encode(key: str, value: object) -> str:
    payload = json.dumps({key: value}, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")


def _decode(token: str, key: str) -> object:
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_LENGTH:
        raise _malformed()
    try:
        padded = (token + "=" * (-len(token) % 4)).encode("ascii")
        raw = base64.b64decode(padded, altchars=b"-_", validate=True)
        payload = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError):
        raise _malformed() from None
    if not isinstance(payload, dict) or set(payload) != {key}:
        raise _malformed()
    return payload[key]


def _malformed() -> InvalidRequest:
    return InvalidRequest(
        "page_token is malformed: pass back the next_page_token of a previous page "
        "of the same listing",
        metadata={"field": "page_token"},
    )


def encode_records_token(last_game_id: str) -> str:
    """Return the token of the records page that starts after `last_game_id`."""
    return _encode(_RECORDS_KEY, last_game_id)


def decode_records_token(token: str) -> str | None:
    """Return the game id a records page starts after (None for an empty token)."""
    if token == "":
        return None
    value = _decode(token, _RECORDS_KEY)
    if not isinstance(value, str) or not is_valid_game_id(value):
        raise _malformed()
    return value


def encode_operations_token(last_id: int) -> str:
    """Return the token of the operation-log page that starts below id `last_id`."""
    return _encode(_OPERATIONS_KEY, last_id)


def decode_operations_token(token: str) -> int | None:
    """Return the id an operation-log page starts below (None for an empty token)."""
    if token == "":
        return None
    value = _decode(token, _OPERATIONS_KEY)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**63:
        raise _malformed()
    return value
