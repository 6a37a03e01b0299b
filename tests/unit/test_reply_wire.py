"""GetRuntime and ListRuntimes replies assembled from memoised record bytes.

The servicers send these bytes as they are, so they must be exactly what
protobuf writes for the same message, for any record and page token.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.api import convert
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus

TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=300)
WHEN = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@st.composite
def records(draw: st.DrawFn) -> RuntimeRecord:
    created = draw(WHEN)
    optional = st.none() | st.builds(
        lambda d: created + d, st.timedeltas(timedelta(0), timedelta(days=3650))
    )
    return RuntimeRecord(
        game_id=draw(TEXT),
        status=draw(st.sampled_from(RuntimeStatus)),
        engine_endpoint=draw(TEXT),
        state_path=draw(TEXT),
        docker_network=draw(TEXT),
        last_op_at=created + draw(st.timedeltas(timedelta(0), timedelta(days=3650))),
        created_at=created,
        current_container_id=draw(TEXT),
        current_image_ref=draw(TEXT),
        started_at=draw(optional),
        stopped_at=draw(optional),
        removed_at=draw(optional),
        node_id=draw(TEXT),
        node_hostname=draw(TEXT),
    )


@given(records())
def test_get_reply_is_the_bytes_protobuf_writes(record: RuntimeRecord) -> None:
    expected = pb.GetRuntimeResponse(runtime=convert.record_to_pb(record))
    assert convert.get_runtime_reply(record) == expected.SerializeToString()


@given(st.lists(records(), max_size=20), TEXT)
def test_list_reply_is_the_bytes_protobuf_writes(page: list[RuntimeRecord], token: str) -> None:
    expected = pb.ListRuntimesResponse(
        runtimes=[convert.record_to_pb(record) for record in page], next_page_token=token
    )
    wire = convert.list_runtimes_reply(page, token)
    assert wire == expected.SerializeToString()
    assert pb.ListRuntimesResponse.FromString(wire) == expected


@given(records())
def test_a_reply_carries_every_field_of_the_record(record: RuntimeRecord) -> None:
    reply = pb.GetRuntimeResponse.FromString(convert.get_runtime_reply(record))
    assert convert.record_from_pb(reply.runtime) == record


def test_timestamps_keep_microseconds_before_and_after_the_epoch() -> None:
    for when in (
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 12, 1, 10, 0, 0, 123_456, tzinfo=UTC),
    ):
        stamp = convert.timestamp_to_pb(when)
        assert stamp is not None
        assert stamp.ToDatetime(tzinfo=UTC) == when
        assert 0 <= stamp.nanos < 1_000_000_000


def _record(index: int) -> RuntimeRecord:
    when = datetime(2026, 12, 7, 12, 0, index, tzinfo=UTC)
    return RuntimeRecord(
        game_id=f"game-{index}",
        status=RuntimeStatus.RUNNING,
        engine_endpoint=f"http://galaxy-game-{index}:8080",
        state_path=f"/var/lib/galaxy/game-{index}",
        docker_network="galaxy-net",
        last_op_at=when,
        created_at=when,
    )


def test_the_memo_answers_the_same_record_again_and_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(convert, "_FIELD_MEMO_SIZE", 8)
    monkeypatch.setattr(convert, "_fields_by_record", {})
    page = [_record(index) for index in range(20)]
    first = [convert.get_runtime_reply(record) for record in page]

    assert len(convert._fields_by_record) <= 8
    assert convert.get_runtime_reply(page[-1]) is first[-1]  # still memoised
    assert convert.get_runtime_reply(page[0]) == first[0]  # evicted: serialized again
    twin = dataclasses.replace(page[1])  # an equal record that is another object
    assert twin is not page[1]
    assert convert.get_runtime_reply(twin) == first[1]
    assert convert.list_runtimes_reply(page, "") == b"".join(first)
