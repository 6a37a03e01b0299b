"""Proto <-> domain conversion of records, operation entries, watched events and containers."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.api import convert
from rtmanager.api.convert_results import watch_item_to_pb
from rtmanager.domain.errors import InvalidRequest
from rtmanager.domain.explanation import ContainerState
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.lifecycle.watch import ChangeEvent
from tests.unit.test_watch import event

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def inner_stop() -> OperationEntry:
    return OperationEntry(
        id=12,
        game_id="g1",
        op_kind=OpKind.STOP,
        op_source=OpSource.GM_REST,
        outcome=Outcome.SUCCESS,
        started_at=T0,
        finished_at=T0 + timedelta(seconds=1),
        source_ref="gm-7",
        parent_op_kind=OpKind.PATCH,
        parent_operation_id=11,
    )


def test_an_inner_entry_keeps_its_parent_through_the_wire() -> None:
    message = convert.operation_to_pb(inner_stop())
    assert (message.parent_op_kind, message.parent_operation_id) == (pb.OP_KIND_PATCH, 11)
    assert convert.operation_from_pb(message) == inner_stop()


def test_an_entry_without_parent_has_none_on_the_wire() -> None:
    plain = OperationEntry(
        id=3,
        game_id="g1",
        op_kind=OpKind.RESTART,
        op_source=OpSource.GM_REST,
        outcome=Outcome.SUCCESS,
        started_at=T0,
    )
    message = convert.operation_to_pb(plain)
    assert (message.parent_op_kind, message.parent_operation_id) == (pb.OP_KIND_UNSPECIFIED, 0)
    assert convert.operation_from_pb(message) == plain


def test_an_event_with_an_unknown_parent_kind_is_refused() -> None:
    message = watch_item_to_pb(ChangeEvent(event(4))).event
    message.parent_op_kind = 99  # type: ignore[assignment]
    message.parent_operation_id = 3
    with pytest.raises(InvalidRequest, match="parent_op_kind"):
        convert.event_from_pb(message)


NODE_ID = "n7x2k9q4w1e5r8t3y6u0i2o4p"


def test_a_record_keeps_its_node_through_the_wire() -> None:
    placed = replace(event(5).record, node_id=NODE_ID, node_hostname="worker-2")
    message = convert.record_to_pb(placed)
    assert (message.node_id, message.node_hostname) == (NODE_ID, "worker-2")
    assert convert.record_from_pb(message) == placed


def test_a_record_of_the_single_host_has_no_node_on_the_wire() -> None:
    message = convert.record_to_pb(event(5).record)
    assert (message.node_id, message.node_hostname) == ("", "")
    assert convert.record_from_pb(message).node_id == ""


def test_a_watched_event_carries_the_node_of_its_record() -> None:
    watched = event(6)
    placed = replace(watched, record=replace(watched.record, node_id=NODE_ID, node_hostname="w2"))
    message = watch_item_to_pb(ChangeEvent(placed)).event
    assert (message.runtime.node_id, message.runtime.node_hostname) == (NODE_ID, "w2")
    assert convert.event_from_pb(message).record == placed.record


def test_an_explained_container_keeps_its_node_through_the_wire() -> None:
    container = ContainerState(
        id="c" * 64,
        name="galaxy-game-g1",
        status="running",
        running=True,
        owned=True,
        node_id=NODE_ID,
        node_hostname="worker-2",
    )
    message = convert.container_state_to_pb(container)
    assert (message.node_id, message.node_hostname) == (NODE_ID, "worker-2")
    assert convert.container_state_from_pb(message) == container
