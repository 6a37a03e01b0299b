"""GetRuntime and ListRuntimes replies assembled from memoised record bytes.

The servicers send these bytes as they are, so they must be exactly what
protobuf writes for the same message, for any record and page token.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
