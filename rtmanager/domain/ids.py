"""Game identifiers and the names derived from them.

A game id becomes part of a container name, a hostname and a host path, so it
is restricted to lower-case DNS-label material before anything else sees it.
"""

from __future__ import annotations

import re

from rtmanager.domain.errors import InvalidRequest

GAME_ID_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,49}[a-z0-9])?$"
_GAME_ID = re.compile(GAME_ID_PATTERN)
CONTAINER_NAME_PREFIX = "galaxy-game-"


def is_valid_game_id(value: str) -> bool:
    """Report whether `value` is an acceptable game id."""
    return _GAME_ID.fullmatch(value) is not None


def parse_game_id(value: str) -> str:
    """Return `value` when it is a valid game id; raise `InvalidRequest` otherwise."""
    if not isinstance(value, str) or not is_valid_game_id(value):
        shown = value if isinstance(value, str) and len(value) <= 64 else f"{str(value)[:64]}..."
        raise InvalidRequest(
            f"game_id {shown!r} is invalid: expected 1-51 characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit",
            metadata={"field": "game_id"},
        )
    return value


def container_name(game_id: str) -> str:
    """Return the container name (and hostname) of a game's engine."""
    return f"{CONTAINER_NAME_PREFIX}{game_id}"


def engine_endpoint(game_id: str, port: int) -> str:
    """Return the stable URL Game Master uses to reach a game's engine."""
    return f"http://{container_name(game_id)}:{port}"


MAX_SOURCE_REF_LENGTH = 256


def parse_source_ref(value: str) -> str:
    """Return a caller's source_ref when it is storable; raise `InvalidRequest` otherwise.

    At most 256 printable characters: it is an opaque reference (a request id,
    a stream entry id), not a payload.
    """
    if len(value) > MAX_SOURCE_REF_LENGTH or not value.isprintable():
        raise InvalidRequest(
            f"source_ref must be at most {MAX_SOURCE_REF_LENGTH} printable characters",
            metadata={"field": "source_ref"},
        )
    return value
