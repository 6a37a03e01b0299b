"""The node a runtime runs on, on fakes.

The record takes its node from what the engine backend reports for the
engine it started or adopted; on the single-host backend there is none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rtmanager.domain.operation import OpKind, OpSource
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus
from rtmanager.lifecycle.common import LifecycleDeps
from rtmanager.lifecycle.patch import PatchRequest
from rtmanager.lifecycle.reconcile import ActionKind, Reconciler
from rtmanager.lifecycle.restart import RestartRequest
from rtmanager.lifecycle.start import StartRequest
from rtmanager.lifecycle.stop import StopRequest
from rtmanager.telemetry import Telemetry
from tests.unit.fakes import FakeNode
from tests.unit.harness import IMAGE, IMAGE_PATCH, Harness, make_harness

GAME = "g1"
NODE_A = FakeNode(id="node-a-7x2k9q4w1e5r8t3y6u0", hostname="worker-a")
NODE_B = FakeNode(id="node-b-3m8n1b6v4c9x2z5l7k0", hostname="worker-b")


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return make_harness(tmp_path)


def node_of(record: RuntimeRecord) -> tuple[str, str]:
    return record.node_id, record.node_hostname


def start(h: Harness, image_ref: str = IMAGE) -> None:
    result = h.start.handle(StartRequest(GAME, image_ref, OpSource.ADMIN_REST))
    assert result.ok, result.failure


def reconciler_of(h: Harness) -> Reconciler:
    deps = LifecycleDeps(recorder=h.recorder, lock=h.lock, engine=h.docker, settings=h.settings)
    return Reconciler(deps, telemetry=Telemetry())


def test_a_start_on_the_single_host_records_no_node(h: Harness) -> None:
    start(h)

    assert node_of(h.record(GAME)) == ("", "")


def test_a_start_records_the_node_the_backend_placed_the_engine_on(h: Harness) -> None:
    h.docker.node = NODE_A

    start(h)

    record = h.record(GAME)
    assert node_of(record) == (NODE_A.id, NODE_A.hostname)
    # The watch feed carries the record, node and all.
    assert node_of(h.events(GAME)[-1].record) == (NODE_A.id, NODE_A.hostname)


def test_a_stopped_runtime_keeps_the_node_it_ran_on(h: Harness) -> None:
    h.docker.node = NODE_A
    start(h)

    result = h.stop.handle(StopRequest(GAME, OpSource.ADMIN_REST))

    assert result.ok, result.failure
    record = h.record(GAME)
    assert record.status is RuntimeStatus.STOPPED
    assert node_of(record) == (NODE_A.id, NODE_A.hostname)


def test_a_start_of_a_stopped_runtime_records_the_new_node(h: Harness) -> None:
    h.docker.node = NODE_A
    start(h)
    assert h.stop.handle(StopRequest(GAME, OpSource.ADMIN_REST)).ok
    h.docker.node = NODE_B

    start(h)

    assert node_of(h.record(GAME)) == (NODE_B.id, NODE_B.hostname)


def test_a_restart_records_the_node_of_the_new_engine(h: Harness) -> None:
    h.docker.node = NODE_A
    start(h)
    h.docker.node = NODE_B

    result = h.restart.handle(RestartRequest(GAME, OpSource.GM_REST))

    assert result.ok, result.failure
    assert node_of(h.record(GAME)) == (NODE_B.id, NODE_B.hostname)
    # The inner start's event and the restart's own both name the new node.
    events = h.events(GAME)
    assert [e.op_kind for e in events[-2:]] == [OpKind.START, OpKind.RESTART]
    assert {node_of(e.record) for e in events[-2:]} == {(NODE_B.id, NODE_B.hostname)}


def test_a_patch_records_the_node_of_the_new_engine(h: Harness) -> None:
    h.docker.node = NODE_A
    start(h)
    h.docker.node = NODE_B

    result = h.patch.handle(PatchRequest(GAME, IMAGE_PATCH, OpSource.GM_REST))

    assert result.ok, result.failure
    record = h.record(GAME)
    assert (record.current_image_ref, *node_of(record)) == (
        IMAGE_PATCH,
        NODE_B.id,
        NODE_B.hostname,
    )


def test_an_adopted_engine_is_recorded_on_its_node(h: Harness) -> None:
    h.docker.node = NODE_A
    h.docker.add_engine(GAME, IMAGE)

    report = reconciler_of(h).run_pass()

    assert [(a.kind, a.applied) for a in report.actions] == [(ActionKind.ADOPT, True)]
    assert node_of(h.record(GAME)) == (NODE_A.id, NODE_A.hostname)


def test_an_adopted_engine_of_the_single_host_has_no_node(h: Harness) -> None:
    h.docker.add_engine(GAME, IMAGE)

    reconciler_of(h).run_pass()

    assert node_of(h.record(GAME)) == ("", "")


def test_a_stopped_runtime_bound_to_its_revived_engine_takes_that_engine_s_node(
    h: Harness,
) -> None:
    h.seed_stopped(GAME)
    h.docker.node = NODE_B
    h.docker.add_engine(GAME, IMAGE)

    report = reconciler_of(h).run_pass()

    assert [(a.kind, a.applied) for a in report.actions] == [(ActionKind.MARK_RUNNING, True)]
    record = h.record(GAME)
    assert record.status is RuntimeStatus.RUNNING
    assert node_of(record) == (NODE_B.id, NODE_B.hostname)
