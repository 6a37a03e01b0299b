"""Pooled PostgreSQL connections notice a vanished server: keepalives and tcp_user_timeout."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from rtmanager.adapters.postgres.pool import (
    KEEPALIVES_COUNT,
    KEEPALIVES_IDLE_SECONDS,
    KEEPALIVES_INTERVAL_SECONDS,
    TCP_USER_TIMEOUT_MS,
    Pool,
    connect_kwargs,
    create_pool,
)
from tests.conftest import POSTGRES_DSN

pytestmark = pytest.mark.integration


@pytest.fixture
def pool(pg_schema: str) -> Iterator[Pool]:
    pool = create_pool(POSTGRES_DSN, pg_schema, max_size=2, timeout=10)
    try:
        yield pool
    finally:
        pool.close()


def test_connect_kwargs_carry_keepalives_and_tcp_user_timeout() -> None:
    kwargs = connect_kwargs(connect_timeout=0.2, application_name="x" * 100)
    assert kwargs["connect_timeout"] == 1  # whole seconds, never 0 ("forever")
    assert len(kwargs["application_name"]) == 63
    assert kwargs["keepalives"] == 1
    assert kwargs["keepalives_idle"] == KEEPALIVES_IDLE_SECONDS
    assert kwargs["keepalives_interval"] == KEEPALIVES_INTERVAL_SECONDS
    assert kwargs["keepalives_count"] == KEEPALIVES_COUNT
    assert kwargs["tcp_user_timeout"] == TCP_USER_TIMEOUT_MS


def test_pooled_connections_are_opened_with_the_keepalive_parameters(pool: Pool) -> None:
    with pool.connection() as conn:
        options = {
            option.keyword.decode(): (option.val or b"").decode() for option in conn.pgconn.info
        }
    assert options["keepalives"] == "1"
    assert options["keepalives_idle"] == str(KEEPALIVES_IDLE_SECONDS)
    assert options["keepalives_interval"] == str(KEEPALIVES_INTERVAL_SECONDS)
    assert options["keepalives_count"] == str(KEEPALIVES_COUNT)
    assert options["tcp_user_timeout"] == str(TCP_USER_TIMEOUT_MS)


def test_pooled_connection_sockets_have_keepalive_and_user_timeout_set(pool: Pool) -> None:
    # What the kernel applies, not only what libpq was told: the test
    # database is reached over TCP on loopback.
    with pool.connection() as conn:
        fd = conn.pgconn.socket
        with socket.socket(fileno=socket.dup(fd)) as sock:
            assert sock.family in (socket.AF_INET, socket.AF_INET6), "test DSN must use TCP"
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == (
                KEEPALIVES_IDLE_SECONDS
            )
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == (
                KEEPALIVES_INTERVAL_SECONDS
            )
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVES_COUNT
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == (
                TCP_USER_TIMEOUT_MS
            )
