"""WatchRuntimes through real servers: snapshot, live events, resume, replicas, limits."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import grpc.aio
import psycopg
import pytest

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.client import (
    CursorExpiredError,
    ImagePullFailedError,
    RuntimeManagerClient,
    RuntimeManagerClientError,
    WatchEndedError,
)
from rtmanager.domain.ids import engine_endpoint
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from tests.conftest import POSTGRES_DSN
from tests.e2e.conftest import ServerProcess, replica_env, start_server

pytestmark = pytest.mark.e2e

STUB = "galaxy/engine-stub:1.0.0"
END = object()


class Watcher:
    """Reads one WatchRuntimes stream on a thread into a queue."""

    def __init__(self, address: str, request: pb.WatchRuntimesRequest) -> None:
        self.client = RuntimeManagerClient(address)
        self.items: queue.Queue[object] = queue.Queue()
        self.error: RuntimeManagerClientError | None = None
        self._stream = self.client.watch_runtimes(request)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for item in self._stream:
                self.items.put(item)
        except RuntimeManagerClientError as error:
            self.error = error
        finally:
            self.items.put(END)

    def next(self, kind: str, within: float = 20) -> pb.WatchRuntimesResponse:
        """The next message of `kind`, skipping bookmarks unless asked for."""
        deadline = time.monotonic() + within
        while True:
            item = self.items.get(timeout=max(deadline - time.monotonic(), 0.01))
            assert item is not END, f"stream ended: {self.error}"
            assert isinstance(item, pb.WatchRuntimesResponse)
            if item.WhichOneof("payload") == kind:
                return item
            assert item.WhichOneof("payload") == "bookmark", item

    def events(self, count: int, within: float = 30) -> list[pb.RuntimeEvent]:
        return [self.next("event", within).event for _ in range(count)]

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    opened: list[Watcher] = []
    yield opened
    for watcher in opened:
        watcher.close()


def test_snapshot_then_live_events_in_commit_order(
    server: ServerProcess, watchers: list[Watcher]
) -> None:
    with RuntimeManagerClient(server.address) as client:
        client.start_runtime("w-before", STUB)
        watcher = Watcher(server.address, pb.WatchRuntimesRequest(initial_snapshot=True))
        watchers.append(watcher)
        snap = watcher.next("snapshot")
        assert snap.snapshot.game_id == "w-before"
        done = watcher.next("snapshot_complete").snapshot_complete
        assert done.cursor

        client.start_runtime("w-after", STUB)
        client.stop_runtime("w-before")
    start, stop = watcher.events(2)
    assert (start.runtime.game_id, start.op_kind) == ("w-after", pb.OP_KIND_START)
    assert start.runtime.status == pb.RUNTIME_STATUS_RUNNING
    assert start.op_source == pb.OP_SOURCE_ADMIN
    assert (stop.runtime.game_id, stop.runtime.status) == ("w-before", pb.RUNTIME_STATUS_STOPPED)
    assert int(done.cursor) < int(start.cursor) < int(stop.cursor)


def test_filters_by_game_and_status(server: ServerProcess, watchers: list[Watcher]) -> None:
    watcher = Watcher(
        server.address,
        pb.WatchRuntimesRequest(game_ids=["w-kept"], statuses=[pb.RUNTIME_STATUS_STOPPED]),
    )
    watchers.append(watcher)
    time.sleep(0.5)
    with RuntimeManagerClient(server.address) as client:
        client.start_runtime("w-other", STUB)
        client.start_runtime("w-kept", STUB)
        client.stop_runtime("w-other")
        client.stop_runtime("w-kept")
    (event,) = watcher.events(1)
    assert (event.runtime.game_id, event.runtime.status) == ("w-kept", pb.RUNTIME_STATUS_STOPPED)


def test_a_watcher_resumes_from_its_cursor_across_a_server_restart(
    server: ServerProcess,
    server_environment: dict[str, str],
    watchers: list[Watcher],
    tmp_path: Path,
) -> None:
    watcher = Watcher(server.address, pb.WatchRuntimesRequest())
    watchers.append(watcher)
    time.sleep(0.5)
    with RuntimeManagerClient(server.address) as client:
        client.start_runtime("w-resume", STUB)
        client.stop_runtime("w-resume")
    first, second = watcher.events(2)
    watcher.close()
    assert server.stop() == 0

    again = start_server(server_environment, tmp_path / "again.log")
    try:
        resumed = Watcher(again.address, pb.WatchRuntimesRequest(since=first.cursor))
        watchers.append(resumed)
        (replayed,) = resumed.events(1)
        assert replayed.cursor == second.cursor
        assert replayed.runtime.status == pb.RUNTIME_STATUS_STOPPED
        with RuntimeManagerClient(again.address) as client:
            client.start_runtime("w-resume", STUB)
        (live,) = resumed.events(1)
        assert int(live.cursor) > int(second.cursor)
        assert live.runtime.status == pb.RUNTIME_STATUS_RUNNING
    finally:
        again.stop()


def test_a_watcher_resuming_with_its_last_cursor_gets_exactly_what_it_missed(
    server: ServerProcess,
    server_environment: dict[str, str],
    watchers: list[Watcher],
    tmp_path: Path,
) -> None:
    """Changes made while its server is down (through another replica) come once, in order."""
    watcher = Watcher(server.address, pb.WatchRuntimesRequest(initial_snapshot=True))
    watchers.append(watcher)
    watcher.next("snapshot_complete")  # subscribed: nothing committed from now is missed
    with RuntimeManagerClient(server.address) as client:
        client.start_runtime("w-gap-a", STUB)
    (seen,) = watcher.events(1)
    last_cursor = seen.cursor
    watcher.close()
    assert server.stop() == 0

    env = replica_env(server_environment)
    replica = start_server(env, tmp_path / "replica.log")
    try:
        with RuntimeManagerClient(replica.address) as client:
            client.stop_runtime("w-gap-a")
            client.start_runtime("w-gap-b", STUB)
            client.start_runtime("w-gap-a", STUB)
    finally:
        replica.stop()

    again = start_server(server_environment, tmp_path / "again.log")
    try:
        resumed = Watcher(again.address, pb.WatchRuntimesRequest(since=last_cursor))
        watchers.append(resumed)
        missed = resumed.events(3)
        assert [(e.runtime.game_id, e.runtime.status) for e in missed] == [
            ("w-gap-a", pb.RUNTIME_STATUS_STOPPED),
            ("w-gap-b", pb.RUNTIME_STATUS_RUNNING),
            ("w-gap-a", pb.RUNTIME_STATUS_RUNNING),
        ]
        cursors = [int(last_cursor)] + [int(e.cursor) for e in missed]
        assert cursors == sorted(set(cursors)), "in order, none repeated"
        with RuntimeManagerClient(again.address) as client:
            client.stop_runtime("w-gap-b")
        # The next event is the new change: nothing replayed twice in between.
        (live,) = resumed.events(1)
        assert (live.runtime.game_id, live.runtime.status) == (
            "w-gap-b",
            pb.RUNTIME_STATUS_STOPPED,
        )
        assert int(live.cursor) > cursors[-1]
    finally:
        again.stop()


def test_a_change_through_one_replica_reaches_a_watcher_on_another(
    server: ServerProcess,
    server_environment: dict[str, str],
    watchers: list[Watcher],
    tmp_path: Path,
) -> None:
    env = replica_env(server_environment)
    replica = start_server(env, tmp_path / "replica.log")
    try:
        watcher = Watcher(replica.address, pb.WatchRuntimesRequest())
        watchers.append(watcher)
        time.sleep(0.5)
        with RuntimeManagerClient(server.address) as client:
            client.start_runtime("w-replica", STUB)
        (event,) = watcher.events(1)
        assert event.runtime.game_id == "w-replica"
    finally:
        replica.stop()


def test_a_cursor_older_than_retention_is_out_of_range(
    server: ServerProcess, server_environment: dict[str, str]
) -> None:
    with RuntimeManagerClient(server.address) as client:
        client.start_runtime("w-old", STUB)
        client.stop_runtime("w-old")
        schema = server_environment["RTMANAGER_POSTGRES_SCHEMA"]
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            row = conn.execute(f'SELECT min(id), max(id) FROM "{schema}".runtime_events').fetchone()
            assert row is not None
            first, newest = row
            conn.execute(
                f'UPDATE "{schema}".runtime_event_retention SET pruned_through = %s', (newest,)
            )
        with pytest.raises(CursorExpiredError) as caught:
            next(iter(client.watch_runtimes(pb.WatchRuntimesRequest(since=str(first)))))
        assert caught.value.status.name == "OUT_OF_RANGE"
        with pytest.raises(RuntimeManagerClientError) as bogus:
            next(iter(client.watch_runtimes(pb.WatchRuntimesRequest(since=str(newest + 1000)))))
        assert bogus.value.code == "invalid_request"


def test_watchers_are_bounded_and_a_slow_one_is_ended_with_its_cursor(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_WATCH_MAX_SUBSCRIBERS"] = "1"
    env["RTMANAGER_WATCH_QUEUE_SIZE"] = "10"
    env["RTMANAGER_WATCH_HEARTBEAT"] = "300ms"
    server = start_server(env, tmp_path / "server.log")
    schema = env["RTMANAGER_POSTGRES_SCHEMA"]
    try:
        with RuntimeManagerClient(server.address) as client:
            record = client.start_runtime("w-slow", STUB)
            slow = client.watch_runtimes(pb.WatchRuntimesRequest(game_ids=["w-slow"]))
            first = next(iter(slow))  # the first bookmark: the watch is registered
            with (
                RuntimeManagerClient(server.address) as other,
                pytest.raises(WatchEndedError) as full,
            ):
                next(iter(other.watch_runtimes(pb.WatchRuntimesRequest())))
            assert full.value.code == "too_many_watchers"
            assert full.value.status.name == "RESOURCE_EXHAUSTED"

            # Far more changes than the watcher's queue and the transport's
            # buffers hold, while it reads nothing.
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
                row = conn.execute(f'SELECT max(id) FROM "{schema}".operation_log').fetchone()
                assert row is not None
                (operation_id,) = row
                conn.execute(
                    f'INSERT INTO "{schema}".runtime_events (operation_id, game_id, status,'
                    " current_container_id, current_image_ref, engine_endpoint, state_path,"
                    " docker_network, started_at, last_op_at, created_at)"
                    " SELECT %s, 'w-slow', 'running', %s, %s, %s, %s, %s, now(), now(), now()"
                    " FROM generate_series(1, 3000)",
                    (
                        operation_id,
                        record.current_container_id,
                        record.current_image_ref,
                        record.engine_endpoint,
                        record.state_path,
                        record.docker_network,
                    ),
                )
            time.sleep(3)
            received: list[pb.WatchRuntimesResponse] = [first]
            with pytest.raises(WatchEndedError) as ended:
                for message in slow:
                    received.append(message)
            assert ended.value.code == "too_slow"
            assert ended.value.status.name == "RESOURCE_EXHAUSTED"
            delivered = [m.event.cursor for m in received if m.WhichOneof("payload") == "event"]
            assert delivered, "some events were delivered before the end"
            assert ended.value.metadata["cursor"] == delivered[-1]
            assert len(delivered) < 3000
    finally:
        server.stop()


# --- many watchers on the server's event loop -----------------------------------------


def commit_changes(env: dict[str, str], count: int) -> list[str]:
    """Commit `count` record changes as the service does; return their cursors."""
    pool = create_pool(POSTGRES_DSN, env["RTMANAGER_POSTGRES_SCHEMA"], max_size=1, timeout=10)
    units = PostgresUnitOfWorkFactory(pool, default_timeout=timedelta(seconds=10))
    cursors: list[str] = []
    try:
        for n in range(count):
            now = datetime.now(UTC)
            game_id = f"many-{n % 5}"
            record = RuntimeRecord(
                game_id=game_id,
                status=RuntimeStatus.STOPPED,
                engine_endpoint=engine_endpoint(game_id, 8080),
                state_path=f"/state/{game_id}",
                docker_network="galaxy-many",
                last_op_at=now,
                created_at=now,
                current_container_id=f"{n:064x}",
                current_image_ref=STUB,
                started_at=now,
                stopped_at=now,
            )
            entry = OperationEntry(
                game_id=game_id,
                op_kind=OpKind.STOP,
                op_source=OpSource.ADMIN_REST,
                outcome=Outcome.SUCCESS,
                started_at=now,
                finished_at=now,
                image_ref=STUB,
            )
            with units() as uow:
                uow.records.upsert(record)
                uow.events.append(uow.operations.append(entry), record)
                uow.commit()
            cursors.extend(str(event_id) for event_id in uow.committed_event_ids)
    finally:
        pool.close()
    return cursors


async def watch_many(
    address: str, env: dict[str, str], watchers: int, changes: int, within: float
) -> list[list[str]]:
    """Open `watchers` streams, commit `changes` once all are subscribed, and return
    the event cursors each stream received (bookmarks skipped), in order."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    subscribed = 0
    all_subscribed = asyncio.Event()
    received: list[list[str]] = [[] for _ in range(watchers)]

    async def one(index: int) -> None:
        nonlocal subscribed
        stub = pb_grpc.RuntimeServiceStub(channels[index % len(channels)])
        call = stub.WatchRuntimes(pb.WatchRuntimesRequest(initial_snapshot=True))
        async for message in call:
            kind = message.WhichOneof("payload")
            if kind == "snapshot_complete":
                subscribed += 1
                if subscribed == watchers:
                    all_subscribed.set()
            elif kind == "event":
                received[index].append(message.event.cursor)
                if len(received[index]) == changes:
                    call.cancel()
                    return

    tasks = [asyncio.create_task(one(i)) for i in range(watchers)]
    try:
        async with asyncio.timeout(within):
            await all_subscribed.wait()
            await asyncio.to_thread(commit_changes, env, changes)
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close(grace=None)
    return received


def test_a_thousand_watchers_each_receive_every_change_once_in_commit_order(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_WATCH_MAX_SUBSCRIBERS"] = "1000"
    env["RTMANAGER_GRPC_MAX_WORKERS"] = "16"  # watches take no server thread
    server = start_server(env, tmp_path / "server.log")
    try:
        received = asyncio.run(watch_many(server.address, env, 1000, 20, within=150))
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            stored = [
                str(row[0])
                for row in conn.execute(
                    f'SELECT id FROM "{env["RTMANAGER_POSTGRES_SCHEMA"]}".runtime_events'
                    " ORDER BY id"
                )
            ]
        assert len(stored) == 20
        assert all(cursors == stored for cursors in received)
    finally:
        server.stop()


def test_a_cancelled_watch_frees_its_place_at_once(
    server_environment: dict[str, str], tmp_path: Path
) -> None:
    env = dict(server_environment)
    env["RTMANAGER_WATCH_MAX_SUBSCRIBERS"] = "1"
    server = start_server(env, tmp_path / "server.log")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.RuntimeServiceStub(channel)
            first = stub.WatchRuntimes(pb.WatchRuntimesRequest(initial_snapshot=True))
            assert next(iter(first)).WhichOneof("payload") == "snapshot_complete"
            first.cancel()  # type: ignore[no-untyped-call]
            # The server notices the cancellation and unsubscribes; the one
            # place is free again within moments, not at the next heartbeat.
            deadline = time.monotonic() + 5
            while True:
                second = stub.WatchRuntimes(pb.WatchRuntimesRequest(initial_snapshot=True))
                try:
                    assert next(iter(second)).WhichOneof("payload") == "snapshot_complete"
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "the cancelled watch kept its place"
                    time.sleep(0.05)
            second.cancel()  # type: ignore[no-untyped-call]
    finally:
        server.stop()


# --- composite operations: restart and patch as a watcher sees them ------------------


def described(event: pb.RuntimeEvent) -> tuple[object, ...]:
    """What a watcher needs to tell a restart's stop from a game that ended."""
    return (
        pb.OpKind.Name(event.op_kind),
        pb.Outcome.Name(event.outcome),
        pb.RuntimeStatus.Name(event.runtime.status),
        pb.OpKind.Name(event.parent_op_kind),
    )


def stopped_games(events: list[pb.RuntimeEvent]) -> list[str]:
    """Game Master's reading of the events alone: the stops that ended a game.

    A stop naming a parent is a step of that restart or patch, which has an
    event of its own once it is over: the game did not end.
    """
    return [
        e.cursor
        for e in events
        if e.op_kind == pb.OP_KIND_STOP
        and e.runtime.status == pb.RUNTIME_STATUS_STOPPED
        and not e.parent_operation_id
    ]


def subscribed_watcher(address: str, game_id: str, watchers: list[Watcher]) -> Watcher:
    watcher = Watcher(address, pb.WatchRuntimesRequest(game_ids=[game_id], initial_snapshot=True))
    watchers.append(watcher)
    watcher.next("snapshot_complete")  # subscribed: nothing committed from now is missed
    return watcher


def test_a_watcher_tells_a_restart_from_a_stop_by_the_events_alone(
    server: ServerProcess, watchers: list[Watcher]
) -> None:
    watcher = subscribed_watcher(server.address, "w-restart", watchers)
    with RuntimeManagerClient(server.address) as client:
        client.start_runtime("w-restart", STUB)
        client.restart_runtime("w-restart", source_ref="gm-r1")
        client.stop_runtime("w-restart", source_ref="gm-s1")
        rows = list(client.iter_operations(game_id="w-restart"))
    started, inner_stop, inner_start, restarted, stopped = watcher.events(5)

    assert [described(e) for e in (started, inner_stop, inner_start, restarted, stopped)] == [
        ("OP_KIND_START", "OUTCOME_SUCCESS", "RUNTIME_STATUS_RUNNING", "OP_KIND_UNSPECIFIED"),
        ("OP_KIND_STOP", "OUTCOME_SUCCESS", "RUNTIME_STATUS_STOPPED", "OP_KIND_RESTART"),
        ("OP_KIND_START", "OUTCOME_SUCCESS", "RUNTIME_STATUS_RUNNING", "OP_KIND_RESTART"),
        ("OP_KIND_RESTART", "OUTCOME_SUCCESS", "RUNTIME_STATUS_RUNNING", "OP_KIND_UNSPECIFIED"),
        ("OP_KIND_STOP", "OUTCOME_SUCCESS", "RUNTIME_STATUS_STOPPED", "OP_KIND_UNSPECIFIED"),
    ]
    # The inner steps name the restart, whose own event closes them.
    restart_id = restarted.operation_id
    assert inner_stop.parent_operation_id == inner_start.parent_operation_id == restart_id
    assert (restarted.parent_operation_id, stopped.parent_operation_id) == (0, 0)
    assert {inner_stop.source_ref, inner_start.source_ref, restarted.source_ref} == {"gm-r1"}
    assert stopped.source_ref == "gm-s1"
    assert restarted.runtime == inner_start.runtime
    assert stopped_games([started, inner_stop, inner_start, restarted, stopped]) == [stopped.cursor]
    # The operation log says the same: its inner rows name the restart.
    parents = {row.id: (row.op_kind, row.parent_op_kind, row.parent_operation_id) for row in rows}
    assert parents[inner_stop.operation_id] == (OpKind.STOP, OpKind.RESTART, restart_id)
    assert parents[inner_start.operation_id] == (OpKind.START, OpKind.RESTART, restart_id)
    assert parents[restart_id] == (OpKind.RESTART, None, 0)


def test_a_watcher_sees_a_patch_end_whether_it_succeeds_or_fails_half_way(
    server: ServerProcess, watchers: list[Watcher]
) -> None:
    watcher = subscribed_watcher(server.address, "w-patch", watchers)
    with RuntimeManagerClient(server.address) as client:
        client.start_runtime("w-patch", STUB)
        client.patch_runtime("w-patch", "galaxy/engine-stub:1.0.1", source_ref="gm-p1")
        # Absent, and never pulled here: the inner stop succeeds, the inner start fails.
        with pytest.raises(ImagePullFailedError):
            client.patch_runtime("w-patch", "galaxy/engine-stub:1.0.9", source_ref="gm-p2")
    events = watcher.events(6)

    assert [described(e) for e in events] == [
        ("OP_KIND_START", "OUTCOME_SUCCESS", "RUNTIME_STATUS_RUNNING", "OP_KIND_UNSPECIFIED"),
        ("OP_KIND_STOP", "OUTCOME_SUCCESS", "RUNTIME_STATUS_STOPPED", "OP_KIND_PATCH"),
        ("OP_KIND_START", "OUTCOME_SUCCESS", "RUNTIME_STATUS_RUNNING", "OP_KIND_PATCH"),
        ("OP_KIND_PATCH", "OUTCOME_SUCCESS", "RUNTIME_STATUS_RUNNING", "OP_KIND_UNSPECIFIED"),
        ("OP_KIND_STOP", "OUTCOME_SUCCESS", "RUNTIME_STATUS_STOPPED", "OP_KIND_PATCH"),
        ("OP_KIND_PATCH", "OUTCOME_FAILURE", "RUNTIME_STATUS_STOPPED", "OP_KIND_UNSPECIFIED"),
    ]
    _, stop_1, start_1, patched, stop_2, failed = events
    assert stop_1.parent_operation_id == start_1.parent_operation_id == patched.operation_id
    assert patched.runtime.current_image_ref == "galaxy/engine-stub:1.0.1"
    assert stop_2.parent_operation_id == failed.operation_id != patched.operation_id
    assert (stop_2.source_ref, failed.source_ref) == ("gm-p2", "gm-p2")
    # The failed patch left the game stopped, without a container: its event says so.
    assert failed.runtime.current_container_id == ""
    assert stopped_games(events) == []
