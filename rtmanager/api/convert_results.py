"""Proto forms of the server's use-case results: reconcile reports and watch items.

Kept apart from `convert` (records, operations, vocabularies) so that the
Game Master client, which imports `convert`, pulls in no lifecycle code.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.api.convert import (
    OP_KIND_TO_PB,
    OP_SOURCE_TO_PB,
    OUTCOME_TO_PB,
    parent_kind_to_pb,
    record_to_pb,
    timestamp_to_pb,
)
from rtmanager.domain.timeutil import utc_now
from rtmanager.lifecycle.reconcile import ActionKind, ReconcileReport
from rtmanager.lifecycle.watch import (
    Bookmark,
    ChangeEvent,
    SnapshotDone,
    SnapshotRecord,
    WatchItem,
    format_cursor,
)

RECONCILE_ACTION_TO_PB: Mapping[ActionKind, pb.ReconcileActionKind.ValueType] = {
    ActionKind.ADOPT: pb.RECONCILE_ACTION_KIND_ADOPT,
    ActionKind.DISPOSE: pb.RECONCILE_ACTION_KIND_DISPOSE,
    ActionKind.MARK_STOPPED: pb.RECONCILE_ACTION_KIND_MARK_STOPPED,
    ActionKind.MARK_RUNNING: pb.RECONCILE_ACTION_KIND_MARK_RUNNING,
}


def reconcile_report_to_pb(report: ReconcileReport) -> pb.ReconcileResponse:
    """Return the proto form of a reconcile pass's report."""
    return pb.ReconcileResponse(
        dry_run=report.dry_run,
        actions=[
            pb.ReconcileAction(
                kind=RECONCILE_ACTION_TO_PB[action.kind],
                game_id=action.game_id,
                container_id=action.container_id,
                image_ref=action.image_ref,
                applied=action.applied,
                skipped_reason=action.skipped_reason,
            )
            for action in report.actions
        ],
        adopted=report.count(ActionKind.ADOPT),
        disposed=report.count(ActionKind.DISPOSE),
        marked_stopped=report.count(ActionKind.MARK_STOPPED),
        marked_running=report.count(ActionKind.MARK_RUNNING),
        skipped=report.skipped,
    )


def watch_item_to_pb(item: WatchItem) -> pb.WatchRuntimesResponse:
    """Return the proto form of one item of a watch stream."""
    if isinstance(item, SnapshotRecord):
        return pb.WatchRuntimesResponse(snapshot=record_to_pb(item.record))
    if isinstance(item, SnapshotDone):
        return pb.WatchRuntimesResponse(
            snapshot_complete=pb.SnapshotComplete(cursor=format_cursor(item.cursor))
        )
    if isinstance(item, Bookmark):
        return pb.WatchRuntimesResponse(
            bookmark=pb.Bookmark(
                cursor=format_cursor(item.cursor), server_time=timestamp_to_pb(utc_now())
            )
        )
    event = item.event
    return pb.WatchRuntimesResponse(
        event=pb.RuntimeEvent(
            cursor=format_cursor(event.id),
            op_kind=OP_KIND_TO_PB[event.op_kind],
            op_source=OP_SOURCE_TO_PB[event.op_source],
            outcome=OUTCOME_TO_PB[event.outcome],
            runtime=record_to_pb(event.record),
            operation_id=event.operation_id,
            committed_at=timestamp_to_pb(event.committed_at),
            source_ref=event.source_ref,
            parent_op_kind=parent_kind_to_pb(event.parent_op_kind),
            parent_operation_id=event.parent_operation_id,
        )
    )


class WatchWire:
    """The wire bytes of watch items: what `WatchRuntimes` sends.

    A change's `WatchRuntimesResponse` is built and serialized once and the
    bytes are shared by every watcher that sends it, instead of once per
    watcher: they are kept by event id (an id names one committed change for
    good) for the newest `remember` events. Snapshot records, the end of a
    snapshot and bookmarks belong to one watcher and are encoded each time.
    """

    def __init__(self, remember: int = 4096) -> None:
        self._remember = remember
        self._events: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, item: WatchItem) -> bytes:
        """The serialized `WatchRuntimesResponse` of `item`."""
        if not isinstance(item, ChangeEvent):
            return watch_item_to_pb(item).SerializeToString()
        event_id = item.event.id
        wire = self._events.get(event_id)
        if wire is None:
            # Encoded under the lock, so the watchers woken by one event
            # wait for the first one's bytes instead of each making their own.
            with self._lock:
                wire = self._events.get(event_id)
                if wire is None:
                    wire = watch_item_to_pb(item).SerializeToString()
                    self._events[event_id] = wire
                    if len(self._events) > self._remember:
                        self._events.popitem(last=False)
        return wire
