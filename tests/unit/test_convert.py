"""Proto <-> domain conversion of operation entries and watched events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.api import convert
from rtmanager.api.convert_results import watch_item_to_pb
from rtmanager.domain.errors import InvalidRequest
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
