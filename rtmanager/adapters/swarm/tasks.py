"""The swarm backend's tasks: what one says about its engine, and the events polling them yields.

A swarm reports engines as tasks of services, and the manager streams no
task events, so the adapter judges each task against its node (`task_view`)
and `SwarmTaskEventStream` compares successive polls (`task_changes`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from rtmanager.adapters.docker.calls import int_or_none, parse_docker_time
from rtmanager.ports import ContainerEvent

__all__ = [
    "TERMINAL_STATES",
    "SwarmTaskEventStream",
    "TaskSnapshots",
    "TaskView",
    "current_task",
    "task_changes",
    "task_container_id",
    "task_view",
]

# Task states after which the task never runs again.
TERMINAL_STATES = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned", "remove"})


class TaskSnapshots(Protocol):
    """What `SwarmTaskEventStream` polls: the swarm adapter's `task_snapshot`."""

    def task_snapshot(self) -> dict[str, tuple[str, bool, int | None]]:
        """Container id -> (game id, running, exit code) of every owned service's tasks."""
        ...


@dataclass(frozen=True)
class TaskView:
    """What one task says about its engine, judged against its node."""

    container_id: str
    state: str
    running: bool
    exit_code: int | None
    error: str
    node_id: str
    started_at: datetime | None
    finished_at: datetime | None


def task_container_id(task: Mapping[str, Any]) -> str:
    """The id of the container the task runs (or ran); "" before it has one."""
    status = task.get("Status") or {}
    return str((status.get("ContainerStatus") or {}).get("ContainerID") or "")


def task_view(task: Mapping[str, Any], node_state: str | None) -> TaskView:
    """Judge one task: running only when reported and desired `running` on a node not `down`."""
    status: Mapping[str, Any] = task.get("Status") or {}
    reported = str(status.get("State") or "")
    desired = str(task.get("DesiredState") or "")
    node_down = node_state == "down"
    running = reported == "running" and desired == "running" and not node_down
    if reported == "running" and not running:
        # The engine is gone or going although the task still says running.
        state = "node-down" if node_down else "stopping"
    else:
        state = reported
    timestamp = parse_docker_time(status.get("Timestamp"))
    exit_code = None
    if reported in TERMINAL_STATES:
        exit_code = int_or_none((status.get("ContainerStatus") or {}).get("ExitCode"))
    return TaskView(
        container_id=task_container_id(task),
        state=state,
        running=running,
        exit_code=exit_code,
        error=str(status.get("Err") or ""),
        node_id=str(task.get("NodeID") or ""),
        started_at=timestamp if reported == "running" else None,
        finished_at=timestamp if reported in TERMINAL_STATES else None,
    )


def current_task(tasks: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The task that stands for the service now: the newest one."""
    return max(tasks, key=lambda t: str(t.get("CreatedAt") or ""), default=None)


def task_changes(
    before: Mapping[str, tuple[str, bool]],
    after: Mapping[str, tuple[str, bool, int | None]],
) -> list[tuple[str, str, str, int | None]]:
    """Container events between two polls: (action, container id, game id, exit code).

    `before` maps a container id to (game id, running); `after` adds the
    exit code. A container newly running is `start`; one that was running
    and no longer is (or vanished) is `die`.
    """
    changes: list[tuple[str, str, str, int | None]] = []
    for container_id, (game_id, running, exit_code) in after.items():
        was = before.get(container_id)
        if running and (was is None or not was[1]):
            changes.append(("start", container_id, game_id, None))
        elif not running and was is not None and was[1]:
            changes.append(("die", container_id, game_id, exit_code))
    for container_id, (game_id, running) in before.items():
        if container_id not in after and running:
            changes.append(("die", container_id, game_id, None))
    return changes


class SwarmTaskEventStream:
    """Owned engines' start and die events, by polling the swarm's tasks (an `EventStream`).

    Every `interval` the manager's services, tasks and nodes are read (as
    `list_owned` does) and compared with the previous poll (`task_changes`).
    A node going down turns its tasks' engines not running, hence `die`.
    The daemon failing raises `ServiceUnavailable`, so the consumer
    reconnects and reconciles; `close()` ends iteration from any thread.
    """

    def __init__(
        self,
        adapter: TaskSnapshots,
        first: dict[str, tuple[str, bool, int | None]],
        interval: float,
    ) -> None:
        """Poll through `adapter`, starting from the snapshot `first`."""
        self._adapter = adapter
        self._previous = first
        self._interval = interval
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[ContainerEvent]:
        """Yield events until closed; raise `ServiceUnavailable` when the manager fails."""
        while not self._closed.wait(self._interval):
            current = self._adapter.task_snapshot()
            before = {cid: (game, running) for cid, (game, running, _) in self._previous.items()}
            now = datetime.now(UTC)
            for action, container_id, game_id, exit_code in task_changes(before, current):
                if self._closed.is_set():
                    return
                yield ContainerEvent(
                    action=action,
                    container_id=container_id,
                    game_id=game_id,
                    time=now,
                    exit_code=exit_code,
                )
            self._previous = current

    def close(self) -> None:
        """End iteration (from any thread); closing twice is harmless."""
        self._closed.set()
