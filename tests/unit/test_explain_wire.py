"""`ExplainRuntimeResponse` <-> `RuntimeExplanation`: what the server sends, the client reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager.api import convert
from rtmanager.domain.errors import InvalidRequest
from rtmanager.domain.explanation import ContainerState, LeaseHolder, RuntimeExplanation
from rtmanager.domain.jobs import JobKind, LobbyJob, PendingJob
from rtmanager.domain.operation import OperationEntry, OpKind, OpSource, Outcome
from rtmanager.domain.runtime import RuntimeRecord, RuntimeStatus

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
CONTAINER = "0123456789abcdef" * 4


def full_explanation() -> RuntimeExplanation:
    record = RuntimeRecord(
        game_id="g1",
        status=RuntimeStatus.STOPPED,
        engine_endpoint="http://galaxy-game-g1:8080",
        state_path="/var/lib/galaxy/games/g1",
        docker_network="galaxy-engines",
        last_op_at=T0 + timedelta(minutes=2),
        created_at=T0,
        current_container_id=CONTAINER,
        current_image_ref="galaxy/engine-stub:1.0.0",
        started_at=T0,
        stopped_at=T0 + timedelta(minutes=2),
    )
    return RuntimeExplanation(
        game_id="g1",
        record=record,
        container=ContainerState(
            id=CONTAINER,
            name="galaxy-game-g1",
            status="exited",
            running=False,
            owned=True,
            image_ref="galaxy/engine-stub:1.0.0",
            image_id="sha256:" + "ab" * 32,
            exit_code=0,  # zero is an exit code, not "none"
            oom_killed=True,
            health="unhealthy",
            started_at=T0,
            finished_at=T0 + timedelta(minutes=1, microseconds=5),
            restart_count=2,
        ),
        operations=(
            OperationEntry(
                id=7,
                game_id="g1",
                op_kind=OpKind.STOP,
                op_source=OpSource.AUTO_RECONCILE,
                outcome=Outcome.SUCCESS,
                started_at=T0 + timedelta(minutes=2),
                finished_at=T0 + timedelta(minutes=2),
                container_id=CONTAINER,
            ),
        ),
        pending_jobs=(
            PendingJob(
                LobbyJob(JobKind.START, "runtime:start_jobs", "1714564800000-0"),
                {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0.1"},
                consumer="rtm-1",
                deliveries=2,
                idle=timedelta(seconds=3, milliseconds=250),
            ),
            PendingJob(
                LobbyJob(JobKind.STOP, "runtime:stop_jobs", "1714564800001-0"),
                {"game_id": "g1"},
            ),
        ),
        pending_jobs_truncated=True,
        lease=LeaseHolder("rtm-2", timedelta(seconds=29, milliseconds=500)),
    )


@pytest.mark.parametrize(
    "explanation",
    [full_explanation(), RuntimeExplanation(game_id="g1")],
    ids=["everything", "nothing"],
)
def test_an_explanation_survives_the_wire(explanation: RuntimeExplanation) -> None:
    message = convert.explanation_to_pb(explanation)
    wire = pb.ExplainRuntimeResponse.FromString(message.SerializeToString())
    assert convert.explanation_from_pb(wire) == explanation


def test_absent_parts_are_absent_on_the_wire() -> None:
    message = convert.explanation_to_pb(
        RuntimeExplanation(
            game_id="g1",
            container=ContainerState(id="c", name="n", status="created", running=False, owned=True),
            lease=LeaseHolder("", None),
        )
    )
    assert not message.HasField("runtime")
    assert not message.container.HasField("exit_code")
    assert message.container.health == ""
    assert not message.lease.HasField("ttl")


def test_a_pending_job_of_an_unknown_kind_is_refused() -> None:
    message = pb.ExplainRuntimeResponse(
        game_id="g1", pending_jobs=[pb.PendingJob(kind=pb.JOB_KIND_UNSPECIFIED, entry_id="1-0")]
    )
    with pytest.raises(InvalidRequest, match="unknown kind"):
        convert.explanation_from_pb(message)
