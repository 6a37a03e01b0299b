"""The chaos soak's final checks (SPEC §11), as plain functions over plain data.

`bench/soak.py` gathers what it saw and what is stored — the jobs in Lobby's
two streams, the answers on the results and dead-letter streams, the
runtime records in PostgreSQL, the cluster's containers in Docker, the
Game Master calls it made and the watch events it received — and hands
them to `evaluate`, which counts every way the service can have gone
wrong. Nothing here does I/O, so `tests/unit/test_soak_checks.py` can
check each rule on data made up for it.

Definitions (each count below must be 0 unless marked informational):

- **produced**: every entry of the two job streams (the streams are the
  truth: a job whose XADD timed out during a Redis pause may still have
  been added). A job is identified by (stream, entry id): the two streams
  number their entries independently.
- **answered**: jobs with at least one answer (a result or a dead letter).
  **dead_lettered**: jobs answered on the dead-letter stream.
  **unanswered**: produced jobs without any answer.
  **answered_twice**: jobs with more than one answer (SPEC §4: exactly one).
  **answers_to_unknown_jobs**: answers naming a job that is in neither
  stream.
- **Lobby's last job** of a game: its job with the greatest position
  (milliseconds, sequence, then start before stop on an exact tie — the
  service's own order, `docs/lobby-jobs.md`).
  **disagreeing_games**: a game whose last job is a start but whose record
  is not `running` on a container that runs; a game whose last job is a
  stop but whose record is `running` or `removed`, or which has a running
  container; a game with a record or container but no job at all. (A stop
  may leave the game `stopped` or without a record.)
- **orphan_containers**: containers owned by the cluster (labelled
  `com.galaxy.owner=rtmanager` and `com.galaxy.rtmanager.cluster=<cluster>`,
  in any state) whose id is not the `current_container_id` of a record in
  status `running` or `stopped`.
- **duplicate_containers**: games with more than one owned container (in
  any state).
- **record_docker_disagreements**: a `running` record whose current
  container is missing or not running, or a `stopped` record whose current
  container runs. (A `stopped` record whose container is gone, or which has
  none, is allowed: SPEC §2.)
- **internal_or_unknown**: Game Master answers with gRPC status INTERNAL or
  UNKNOWN or error code `internal`, job results with error code `internal`,
  and Game Master replies the client could not read.
- Watch: the expected events are the `runtime_events` ids stored after the
  watcher's first cursor (from its initial snapshot). **watch_missing**:
  expected ids never received; **watch_repeated**: receptions of an id
  already received; **watch_unexpected**: received ids that are not
  expected (at or below the first cursor, or not stored at all);
  **watch_out_of_order**: receptions of an id lower than the one before.
- **replica_crashes**: replica exits the soak did not cause;
  **replica_restart_failures**: restarts that did not reach SERVING in time.
- Informational: **answered_after_60s**, jobs first answered more than 60 s
  after they were sent (job entry id to answer entry id, both Redis's
  clock); **answered_after_60s_not_near_a_kill**, those of them a kill -9
  of a replica does not explain: a job sent from 10 s before a kill until
  60 s after it (while the killed replica's leases, 60 s TTL by default,
  may still hold its game) and answered at most 90 s after the kill is
  explained. Any other late answer is worth reading in the report's
  details, which list every late job with its times from the kill.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

START = "start"
STOP = "stop"
RUNNING = "running"
STOPPED = "stopped"
REMOVED = "removed"

MUST_BE_ZERO: tuple[str, ...] = (
    "dead_lettered",
    "unanswered",
    "answered_twice",
    "answers_to_unknown_jobs",
    "disagreeing_games",
    "orphan_containers",
    "duplicate_containers",
    "record_docker_disagreements",
    "internal_or_unknown",
    "watch_missing",
    "watch_repeated",
    "watch_unexpected",
    "watch_out_of_order",
    "replica_crashes",
    "replica_restart_failures",
)
INFORMATIONAL: tuple[str, ...] = (
    "produced",
    "answered",
    "results",
    "answered_after_60s",
    "answered_after_60s_not_near_a_kill",
    "gm_calls",
    "watch_received",
)
# A job answered later than this is counted (informational). A kill -9 of
# a replica explains a late answer of a job sent from KILL_SENT_BEFORE
# seconds before it until its leases (60 s TTL, the default) expire, and
# answered within AFTER_KILLED_LEASES seconds after they did.
LATE_ANSWER = 60.0
KILL_SENT_BEFORE = 10.0
KILLED_LEASES_LAST = 60.0
AFTER_KILLED_LEASES = 30.0


# -- the data ------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One entry of a Lobby job stream."""

    stream: str
    job_id: str
    kind: str
    """`start` or `stop`."""
    game_id: str

    @property
    def key(self) -> tuple[str, str]:
        """(stream, entry id): the job's identity."""
        return (self.stream, self.job_id)

    @property
    def position(self) -> tuple[int, int, int]:
        """The service's order of jobs across both streams."""
        return job_position(self.job_id, self.kind)


@dataclass(frozen=True)
class Answer:
    """One entry of the results or the dead-letter stream."""

    stream: str
    job_id: str
    dead_letter: bool = False
    outcome: str = "success"
    """`success`, `failure`, `superseded`; `dead_letter` for dead letters."""
    error_code: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """The (stream, entry id) of the job it answers."""
        return (self.stream, self.job_id)


@dataclass(frozen=True)
class Record:
    """A runtime record as stored."""

    game_id: str
    status: str
    container_id: str | None = None
    image_ref: str | None = None


@dataclass(frozen=True)
class Container:
    """A container owned by the soak's cluster, as Docker lists it."""

    container_id: str
    game_id: str
    state: str
    """Docker's state: `running`, `exited`, `created`, ..."""

    @property
    def running(self) -> bool:
        """Whether Docker says it runs."""
        return self.state == RUNNING


@dataclass(frozen=True)
class Call:
    """One Game Master call and how it ended."""

    method: str
    status: str
    """The gRPC status name (`OK` on success)."""
    code: str = ""
    """The stable error code from the reply's ErrorInfo, if any."""
    unreadable: bool = False
    """The client raised something other than its typed errors."""


# -- jobs ------------------------------------------------------------------------


def job_position(job_id: str, kind: str) -> tuple[int, int, int]:
    """(milliseconds, sequence, rank) of an entry id; a start ranks before a stop."""
    ms, _, seq = job_id.partition("-")
    return (int(ms), int(seq or 0), 0 if kind == START else 1)


def last_jobs(jobs: Iterable[Job]) -> dict[str, Job]:
    """Lobby's last word for each game."""
    last: dict[str, Job] = {}
    for job in jobs:
        seen = last.get(job.game_id)
        if seen is None or job.position > seen.position:
            last[job.game_id] = job
    return last


@dataclass
class JobAccounting:
    """What became of the produced jobs."""

    produced: int
    answered: int
    results: int
    dead_lettered: list[tuple[str, str]]
    unanswered: list[tuple[str, str]]
    answered_twice: list[tuple[str, str]]
    answers_to_unknown_jobs: list[tuple[str, str]]
    outcomes: Counter[str]
    """Result outcomes, `failure:<code>` for failures (informational)."""


def account_jobs(jobs: Sequence[Job], answers: Sequence[Answer]) -> JobAccounting:
    """Match every produced job with its answers."""
    produced = {job.key for job in jobs}
    count = Counter(answer.key for answer in answers)
    outcomes: Counter[str] = Counter()
    for answer in answers:
        if not answer.dead_letter:
            label = answer.outcome
            if answer.outcome == "failure":
                label = f"failure:{answer.error_code or '?'}"
            outcomes[label] += 1
    dead = sorted({a.key for a in answers if a.dead_letter and a.key in produced})
    return JobAccounting(
        produced=len(produced),
        answered=sum(1 for key in produced if count[key] > 0),
        results=sum(1 for a in answers if not a.dead_letter),
        dead_lettered=dead,
        unanswered=sorted(key for key in produced if count[key] == 0),
        answered_twice=sorted(key for key in produced if count[key] > 1),
        answers_to_unknown_jobs=sorted(key for key in count if key not in produced),
        outcomes=outcomes,
    )


def answer_delays(
    jobs: Sequence[Job], answers: Sequence[Answer], answer_ids: Sequence[str]
) -> list[float]:
    """Seconds from each job's entry id to its first answer's entry id (informational).

    `answer_ids[i]` is the entry id of `answers[i]` on its own stream; both
    ids carry Redis's clock in milliseconds.
    """
    return sorted(delay for _job, delay in _first_answers(jobs, answers, answer_ids).values())


def late_answers(
    jobs: Sequence[Job],
    answers: Sequence[Answer],
    answer_ids: Sequence[str],
    kills_at: Sequence[float],
    *,
    over: float = LATE_ANSWER,
) -> list[dict[str, Any]]:
    """The jobs answered more than `over` seconds after they were sent, oldest
    first, each with when it was sent and answered relative to the last kill
    -9 of a replica begun before it was sent (`kills_at`: wall-clock
    seconds; a job sent up to `KILL_SENT_BEFORE` seconds before a kill
    counts as sent after it; None without any such kill).
    """
    return _late(_first_answers(jobs, answers, answer_ids), kills_at, over)


def near_a_kill(late: dict[str, Any]) -> bool:
    """Whether a late answer is what a kill -9 of a replica explains: the job
    was sent while the killed replica's leases could still hold its game
    (up to `KILLED_LEASES_LAST` after the kill) and answered within
    `AFTER_KILLED_LEASES` of their expiry (retries, the game's other jobs).
    """
    sent, answered = late["sent_after_kill_s"], late["answered_after_kill_s"]
    return (
        sent is not None
        and sent <= KILLED_LEASES_LAST
        and answered <= KILLED_LEASES_LAST + AFTER_KILLED_LEASES
    )


FirstAnswers = dict[tuple[str, str], tuple[Job, float]]
"""Each answered job (by key) with the seconds to its first answer."""


def _first_answers(
    jobs: Sequence[Job], answers: Sequence[Answer], answer_ids: Sequence[str]
) -> FirstAnswers:
    produced = {job.key: job for job in jobs}
    first: FirstAnswers = {}
    for answer, answer_id in zip(answers, answer_ids, strict=True):
        job = produced.get(answer.key)
        if job is None:
            continue
        delay = (job_position(answer_id, START)[0] - job.position[0]) / 1000
        if answer.key not in first or delay < first[answer.key][1]:
            first[answer.key] = (job, delay)
    return first


def _late(first: FirstAnswers, kills_at: Sequence[float], over: float) -> list[dict[str, Any]]:
    late = []
    for job, delay in first.values():
        if delay <= over:
            continue
        sent = job.position[0] / 1000
        kill = max((k for k in kills_at if k <= sent + KILL_SENT_BEFORE), default=None)
        item = {
            "game_id": job.game_id,
            "kind": job.kind,
            "job_id": job.job_id,
            "seconds": round(delay, 1),
            "sent_after_kill_s": None if kill is None else round(sent - kill, 1),
            "answered_after_kill_s": None if kill is None else round(sent + delay - kill, 1),
        }
        late.append((job.position, item))
    return [item for _position, item in sorted(late, key=lambda pair: pair[0])]


# -- records and containers ----------------------------------------------------


def same_container(record_id: str | None, container_id: str) -> bool:
    """Whether a record's container id names this container (full id or a prefix of it)."""
    if not record_id:
        return False
    return container_id == record_id or (
        len(record_id) >= 12 and container_id.startswith(record_id)
    )


def _current(record: Record, containers: Sequence[Container]) -> Container | None:
    for container in containers:
        if same_container(record.container_id, container.container_id):
            return container
    return None


def game_disagreements(
    last: Mapping[str, Job], records: Sequence[Record], containers: Sequence[Container]
) -> list[dict[str, Any]]:
    """Games whose final state disagrees with Lobby's last job (see the module docstring)."""
    by_game = {record.game_id: record for record in records}
    games = set(last) | set(by_game) | {c.game_id for c in containers}
    found: list[dict[str, Any]] = []
    for game_id in sorted(games):
        job = last.get(game_id)
        record = by_game.get(game_id)
        running = [c.container_id for c in containers if c.game_id == game_id and c.running]
        status = record.status if record else None
        problem = ""
        if job is None:
            problem = "no Lobby job, yet the game has a record or a container"
        elif job.kind == START:
            current = _current(record, containers) if record else None
            if record is None:
                problem = "no record"
            elif record.status != RUNNING:
                problem = f"record is {record.status}"
            elif current is None:
                problem = "record's container does not exist"
            elif not current.running:
                problem = f"record's container is {current.state}"
        else:
            if record is not None and record.status != STOPPED:
                problem = f"record is {record.status}"
            elif running:
                problem = "a container of the game runs"
        if problem:
            found.append(
                {
                    "game_id": game_id,
                    "last_job": f"{job.kind} {job.stream} {job.job_id}" if job else None,
                    "record_status": status,
                    "record_container": record.container_id if record else None,
                    "running_containers": running,
                    "problem": problem,
                }
            )
    return found


def orphan_containers(
    records: Sequence[Record], containers: Sequence[Container]
) -> list[Container]:
    """Owned containers that are not the current container of a running or stopped record."""
    live = [r for r in records if r.status in (RUNNING, STOPPED) and r.container_id]
    return [
        c
        for c in containers
        if not any(same_container(r.container_id, c.container_id) for r in live)
    ]


def duplicate_containers(containers: Sequence[Container]) -> dict[str, list[str]]:
    """Games with more than one owned container, and those containers' ids."""
    by_game: dict[str, list[str]] = defaultdict(list)
    for container in containers:
        by_game[container.game_id].append(container.container_id)
    return {game: sorted(ids) for game, ids in sorted(by_game.items()) if len(ids) > 1}


def record_docker_disagreements(
    records: Sequence[Record], containers: Sequence[Container]
) -> list[dict[str, Any]]:
    """Running records without a running container; stopped records whose container runs."""
    found: list[dict[str, Any]] = []
    for record in records:
        current = _current(record, containers)
        if record.status == RUNNING and (current is None or not current.running):
            state = current.state if current else "missing"
            found.append({"game_id": record.game_id, "record": RUNNING, "container": state})
        elif record.status == STOPPED and current is not None and current.running:
            found.append({"game_id": record.game_id, "record": STOPPED, "container": RUNNING})
    return found


# -- answers -----------------------------------------------------------------------


def is_internal_or_unknown(call: Call) -> bool:
    """A Game Master answer that only a bug explains."""
    return call.unreadable or call.status in ("INTERNAL", "UNKNOWN") or call.code == "internal"


def internal_or_unknown(calls: Sequence[Call], answers: Sequence[Answer]) -> dict[str, int]:
    """Game Master answers and job results that only a bug explains, by where they came from."""
    return {
        "gm_internal_or_unknown": sum(
            1 for c in calls if is_internal_or_unknown(c) and not c.unreadable
        ),
        "gm_unreadable": sum(1 for c in calls if c.unreadable),
        "job_internal": sum(1 for a in answers if not a.dead_letter and a.error_code == "internal"),
    }


# -- the watch feed ----------------------------------------------------------------


@dataclass
class WatchCheck:
    """The watcher's events against the stored ones."""

    first_cursor: int | None
    expected: int
    received: int
    missing: list[int]
    repeated: list[int]
    unexpected: list[int]
    out_of_order: int


def check_watch(
    first_cursor: int | None, received: Sequence[int], stored_ids: Iterable[int]
) -> WatchCheck:
    """Compare the received event ids (in the order received) with the stored ones.

    Without a first cursor the watcher never subscribed: every stored id is missing.
    """
    after = -1 if first_cursor is None else first_cursor
    expected = sorted(i for i in set(stored_ids) if i > after)
    expected_set = set(expected)
    got = set(received)
    seen: set[int] = set()
    repeated: list[int] = []
    for event_id in received:
        if event_id in seen:
            repeated.append(event_id)
        seen.add(event_id)
    out_of_order = sum(1 for a, b in itertools.pairwise(received) if b < a)
    return WatchCheck(
        first_cursor=first_cursor,
        expected=len(expected),
        received=len(received),
        missing=[i for i in expected if i not in got],
        repeated=repeated,
        unexpected=sorted(got - expected_set),
        out_of_order=out_of_order,
    )


# -- the verdict -------------------------------------------------------------------


@dataclass
class Report:
    """Every count, the offenders behind each, and whether the run passed."""

    counts: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        """The must-be-zero counts that are not 0."""
        return [name for name in MUST_BE_ZERO if self.counts.get(name, 0) != 0]

    @property
    def ok(self) -> bool:
        """True when every must-be-zero count is 0."""
        return not self.failed


def evaluate(
    *,
    jobs: Sequence[Job],
    answers: Sequence[Answer],
    records: Sequence[Record],
    containers: Sequence[Container],
    calls: Sequence[Call],
    watch_first_cursor: int | None,
    watch_received: Sequence[int],
    stored_event_ids: Iterable[int],
    replica_crashes: int = 0,
    replica_restart_failures: int = 0,
    answer_ids: Sequence[str] | None = None,
    kills_at: Sequence[float] = (),
    limit: int = 50,
) -> Report:
    """Every check of SPEC §11 over the gathered data.

    `answer_ids` (the answers' own entry ids), when given, add how long jobs
    waited for their answers, and which jobs were answered late and how
    near to a kill -9 of a replica (`kills_at`, wall-clock seconds) they
    were sent (informational).
    """
    accounting = account_jobs(jobs, answers)
    first = _first_answers(jobs, answers, answer_ids) if answer_ids is not None else {}
    delays = sorted(delay for _job, delay in first.values())
    late = _late(first, kills_at, LATE_ANSWER)
    last = last_jobs(jobs)
    games = game_disagreements(last, records, containers)
    orphans = orphan_containers(records, containers)
    duplicates = duplicate_containers(containers)
    mismatched = record_docker_disagreements(records, containers)
    internal = internal_or_unknown(calls, answers)
    watch = check_watch(watch_first_cursor, watch_received, stored_event_ids)
    counts = {
        "produced": accounting.produced,
        "answered": accounting.answered,
        "results": accounting.results,
        "dead_lettered": len(accounting.dead_lettered),
        "unanswered": len(accounting.unanswered),
        "answered_twice": len(accounting.answered_twice),
        "answers_to_unknown_jobs": len(accounting.answers_to_unknown_jobs),
        "answered_after_60s": len(late),
        "answered_after_60s_not_near_a_kill": sum(1 for item in late if not near_a_kill(item)),
        "disagreeing_games": len(games),
        "orphan_containers": len(orphans),
        "duplicate_containers": len(duplicates),
        "record_docker_disagreements": len(mismatched),
        "gm_calls": len(calls),
        "internal_or_unknown": sum(internal.values()),
        "watch_received": watch.received,
        "watch_missing": len(watch.missing),
        "watch_repeated": len(watch.repeated),
        "watch_unexpected": len(watch.unexpected),
        "watch_out_of_order": watch.out_of_order,
        "replica_crashes": replica_crashes,
        "replica_restart_failures": replica_restart_failures,
    }
    details: dict[str, Any] = {
        "job_outcomes": dict(sorted(accounting.outcomes.items())),
        "answer_delay_s": {
            "p50": delays[len(delays) // 2] if delays else None,
            "p95": delays[int(len(delays) * 0.95)] if delays else None,
            "max": delays[-1] if delays else None,
        },
        "answered_after_60s": late[:limit],
        "dead_lettered": accounting.dead_lettered[:limit],
        "unanswered": accounting.unanswered[:limit],
        "answered_twice": accounting.answered_twice[:limit],
        "answers_to_unknown_jobs": accounting.answers_to_unknown_jobs[:limit],
        "disagreeing_games": games[:limit],
        "orphan_containers": [
            {"id": c.container_id, "game_id": c.game_id, "state": c.state} for c in orphans[:limit]
        ],
        "duplicate_containers": dict(list(duplicates.items())[:limit]),
        "record_docker_disagreements": mismatched[:limit],
        "internal_or_unknown": internal,
        "gm_answers": dict(sorted(Counter(_call_label(c) for c in calls).items())),
        "last_jobs": {g: f"{j.kind} {j.job_id}" for g, j in sorted(last.items())},
        "records": {r.game_id: r.status for r in sorted(records, key=lambda r: r.game_id)},
        "watch": {
            "first_cursor": watch.first_cursor,
            "expected": watch.expected,
            "received": watch.received,
            "missing": watch.missing[:limit],
            "repeated": watch.repeated[:limit],
            "unexpected": watch.unexpected[:limit],
            "out_of_order": watch.out_of_order,
        },
    }
    return Report(counts=counts, details=details)


def _call_label(call: Call) -> str:
    label = f"{call.method} {call.status}"
    if call.code:
        label += f" {call.code}"
    if call.unreadable:
        label += " (unreadable)"
    return label


def render_table(report: Report) -> str:
    """The counts as a Markdown table: check, count, whether it must be 0, verdict."""
    lines = ["| check | count | must be 0 | |", "| --- | ---: | :---: | --- |"]
    for name, value in report.counts.items():
        must = name in MUST_BE_ZERO
        verdict = ("ok" if value == 0 else "FAIL") if must else ""
        lines.append(f"| {name} | {value} | {'yes' if must else ''} | {verdict} |")
    return "\n".join(lines)
