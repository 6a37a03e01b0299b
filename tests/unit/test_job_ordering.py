"""`GameQueues`: one game's jobs run one at a time in Lobby's order; games run side by side."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rtmanager.domain.jobs import JobKind, JobPosition
from rtmanager.workers.job_ordering import GameQueues


@dataclass(eq=False)
class Job:
    """A queued job: its game and its entry id in the start or stop stream."""

    game_key: str
    kind: JobKind
    entry_id: str

    @property
    def position(self) -> JobPosition:
        return JobPosition.of(self.kind, self.entry_id)


def start(game: str, entry_id: str) -> Job:
    return Job(game, JobKind.START, entry_id)


def stop(game: str, entry_id: str) -> Job:
    return Job(game, JobKind.STOP, entry_id)


def test_the_first_job_of_an_idle_game_runs_at_once() -> None:
    queues: GameQueues[Job] = GameQueues()
    first = start("g1", "1-0")

    assert queues.add(first) is first
    assert len(queues) == 1


def test_a_game_runs_one_job_at_a_time_in_lobbys_order() -> None:
    queues: GameQueues[Job] = GameQueues()
    first, third, second = start("g1", "1-0"), stop("g1", "3-0"), stop("g1", "2-0")
    queues.add(first)

    assert queues.add(third) is None
    assert queues.add(second) is None
    assert queues.finish(first) is second
    assert queues.finish(second) is third
    assert queues.finish(third) is None
    assert len(queues) == 0


def test_on_a_tie_the_start_runs_before_the_stop() -> None:
    queues: GameQueues[Job] = GameQueues()
    head = stop("g1", "1-0")
    queues.add(head)
    tied_stop, tied_start = stop("g1", "5-0"), start("g1", "5-0")
    queues.add(tied_stop)
    queues.add(tied_start)

    assert queues.finish(head) is tied_start
    assert queues.finish(tied_start) is tied_stop


def test_an_older_job_arriving_late_waits_for_the_running_one_but_precedes_younger_ones() -> None:
    queues: GameQueues[Job] = GameQueues()
    running, younger, older = stop("g1", "5-0"), start("g1", "9-0"), start("g1", "2-0")
    queues.add(running)
    queues.add(younger)

    assert queues.add(older) is None  # the head is never pre-empted
    assert queues.finish(running) is older
    assert queues.finish(older) is younger


def test_different_games_run_side_by_side() -> None:
    queues: GameQueues[Job] = GameQueues()
    one, two = start("g1", "2-0"), start("g2", "1-0")

    assert queues.add(one) is one
    assert queues.add(two) is two
    assert queues.finish(two) is None
    assert queues.finish(one) is None


def test_only_the_running_head_can_finish() -> None:
    queues: GameQueues[Job] = GameQueues()
    head, waiting = start("g1", "1-0"), stop("g1", "2-0")
    queues.add(head)
    queues.add(waiting)

    with pytest.raises(ValueError, match="running head"):
        queues.finish(waiting)
    with pytest.raises(ValueError, match="running head"):
        queues.finish(start("g9", "1-0"))


def test_discarding_the_head_lets_the_next_job_run() -> None:
    queues: GameQueues[Job] = GameQueues()
    head, waiting = start("g1", "1-0"), stop("g1", "2-0")
    queues.add(head)
    queues.add(waiting)

    assert queues.discard(head) is waiting
    assert len(queues) == 1


def test_discarding_a_waiting_job_removes_only_it() -> None:
    queues: GameQueues[Job] = GameQueues()
    head, second, third = start("g1", "1-0"), stop("g1", "2-0"), start("g1", "3-0")
    for job in (head, second, third):
        queues.add(job)

    assert queues.discard(second) is None
    assert queues.discard(stop("g1", "2-0")) is None  # another object: not queued
    assert queues.discard(start("g7", "1-0")) is None
    assert queues.finish(head) is third
