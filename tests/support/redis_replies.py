"""The replies of a synchronous redis-py client, typed.

redis-py gives each command one signature for its synchronous and asyncio
clients, so every reply is typed `Awaitable[Any] | Any`; a synchronous
`redis.Redis` returns the value itself. As the adapters do
(rtmanager/adapters/redis/), these only cast a reply to what its command
returns: nothing is checked or converted at run time.

A client made with `decode_responses=True` replies with `str`, one made
without (as `create_redis` makes them) with `bytes`:

    entry_id = replies.text(streams.xadd(stream, fields))
    assert replies.integer(client.xlen(stream)) < 400
"""

from __future__ import annotations

from typing import Any, cast

from redis.typing import ResponseT


def text(reply: ResponseT) -> str:
    """A string reply (an entry id, a value) of a client that decodes responses."""
    return cast("str", reply)


def binary(reply: ResponseT) -> bytes:
    """A string reply (an entry id, a value) of a client that does not decode responses."""
    return cast("bytes", reply)


def integer(reply: ResponseT) -> int:
    """An integer reply: XLEN, PTTL, EXISTS."""
    return cast("int", reply)


def entries(reply: ResponseT) -> list[tuple[str, dict[str, str]]]:
    """The entries of XRANGE, (id, fields) each, of a client that decodes responses."""
    return cast("list[tuple[str, dict[str, str]]]", reply)


def binary_entries(reply: ResponseT) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of XRANGE, (id, fields) each, of a client that does not decode responses."""
    return cast("list[tuple[bytes, dict[bytes, bytes]]]", reply)


def mapping(reply: ResponseT) -> dict[str, Any]:
    """A dict with string keys: XPENDING's summary."""
    return cast("dict[str, Any]", reply)


def mappings(reply: ResponseT) -> list[dict[str, Any]]:
    """A list of dicts with string keys: XPENDING with a range, XINFO CONSUMERS."""
    return cast("list[dict[str, Any]]", reply)
