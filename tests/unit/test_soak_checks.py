"""The chaos soak's final checks (bench/soak_checks.py) on made-up data: each one can fail."""

from __future__ import annotations

from bench.soak_checks import (
    MUST_BE_ZERO,
    Answer,
    Call,
    Container,
    Job,
    Record,
    account_jobs,
    answer_delays,
    check_watch,
    duplicate_containers,
    evaluate,
    game_disagreements,
    internal_or_unknown,
    job_position,
    last_jobs,
    late_answers,
    near_a_kill,
    orphan_containers,
    record_docker_disagreements,
    render_table,
)

STARTS = "p:start_jobs"
STOPS = "p:stop_jobs"
C1 = "a" * 64
C2 = "b" * 64
C3 = "c" * 64


def start(job_id: str, game: str = "g1") -> Job:
    return Job(STARTS, job_id, "start", game)


def stop(job_id: str, game: str = "g1") -> Job:
    return Job(STOPS, job_id, "stop", game)


def result(job: Job, outcome: str = "success", code: str = "") -> Answer:
    return Answer(job.stream, job.job_id, False, outcome, code)


def dead(job: Job) -> Answer:
    return Answer(job.stream, job.job_id, True, "dead_letter")


# -- jobs --------------------------------------------------------------------------


def test_job_order_is_milliseconds_then_sequence_then_start_before_stop() -> None:
    assert job_position("10-2", "start") < job_position("11-0", "start")
    assert job_position("10-1", "stop") < job_position("10-2", "start")
    assert job_position("10-0", "start") < job_position("10-0", "stop")


def test_lobbys_last_word_is_the_newest_job_across_both_streams() -> None:
    jobs = [start("100-0"), stop("101-0"), start("102-0", "g2"), stop("90-0", "g2")]
    last = last_jobs(jobs)
    assert last["g1"] == stop("101-0")
    assert last["g2"] == start("102-0", "g2")


def test_a_start_and_a_stop_with_the_same_id_end_with_the_stop() -> None:
    assert last_jobs([stop("100-0"), start("100-0")])["g1"].kind == "stop"


def test_every_job_answered_once_counts_nothing() -> None:
    jobs = [start("1-0"), stop("2-0")]
    accounting = account_jobs(jobs, [result(j) for j in jobs])
    assert (accounting.produced, accounting.answered, accounting.results) == (2, 2, 2)
    assert accounting.unanswered == accounting.answered_twice == accounting.dead_lettered == []


def test_jobs_of_the_two_streams_with_one_id_are_two_jobs() -> None:
    jobs = [start("5-0"), stop("5-0")]
    accounting = account_jobs(jobs, [result(jobs[0])])
    assert accounting.produced == 2
    assert accounting.unanswered == [(STOPS, "5-0")]


def test_unanswered_twice_answered_dead_lettered_and_unknown_answers_are_counted() -> None:
    a, b, c = start("1-0"), stop("2-0"), start("3-0")
    ghost = start("9-0")
    accounting = account_jobs(
        [a, b, c], [result(a), result(a, "superseded"), dead(b), result(ghost)]
    )
    assert accounting.unanswered == [c.key]
    assert accounting.answered_twice == [a.key]
    assert accounting.dead_lettered == [b.key]
    assert accounting.answers_to_unknown_jobs == [ghost.key]
    assert accounting.answered == 2


# -- games, records, containers --------------------------------------------------


def test_a_final_start_needs_a_running_record_on_a_running_container() -> None:
    last = {"g1": start("1-0")}
    good = game_disagreements(last, [Record("g1", "running", C1)], [Container(C1, "g1", "running")])
    assert good == []
    stopped = game_disagreements(
        last, [Record("g1", "stopped", C1)], [Container(C1, "g1", "exited")]
    )
    assert [d["problem"] for d in stopped] == ["record is stopped"]
    dead_engine = game_disagreements(
        last, [Record("g1", "running", C1)], [Container(C1, "g1", "exited")]
    )
    assert [d["problem"] for d in dead_engine] == ["record's container is exited"]
    gone = game_disagreements(last, [Record("g1", "running", C1)], [])
    assert [d["problem"] for d in gone] == ["record's container does not exist"]
    assert [d["problem"] for d in game_disagreements(last, [], [])] == ["no record"]


def test_a_final_stop_allows_stopped_or_no_record_but_nothing_running() -> None:
    last = {"g1": stop("1-0")}
    assert game_disagreements(last, [], []) == []
    assert game_disagreements(last, [Record("g1", "stopped", None)], []) == []
    assert (
        game_disagreements(last, [Record("g1", "stopped", C1)], [Container(C1, "g1", "exited")])
        == []
    )
    running = game_disagreements(
        last, [Record("g1", "running", C1)], [Container(C1, "g1", "running")]
    )
    assert [d["problem"] for d in running] == ["record is running"]
    removed = game_disagreements(last, [Record("g1", "removed", None)], [])
    assert [d["problem"] for d in removed] == ["record is removed"]
    stray = game_disagreements(last, [], [Container(C2, "g1", "running")])
    assert [d["problem"] for d in stray] == ["a container of the game runs"]


def test_a_game_lobby_never_mentioned_must_have_nothing() -> None:
    found = game_disagreements({}, [Record("g9", "stopped", None)], [])
    assert [d["game_id"] for d in found] == ["g9"]


def test_orphans_are_owned_containers_no_running_or_stopped_record_points_at() -> None:
    records = [
        Record("g1", "running", C1),
        Record("g2", "stopped", C2[:12]),  # a short id names the container too
        Record("g3", "removed", C3),
    ]
    containers = [
        Container(C1, "g1", "running"),
        Container(C2, "g2", "exited"),
        Container(C3, "g3", "exited"),
        Container("d" * 64, "g1", "exited"),
    ]
    assert [c.container_id for c in orphan_containers(records, containers)] == [C3, "d" * 64]


def test_duplicates_are_games_with_more_than_one_container_in_any_state() -> None:
    containers = [
        Container(C1, "g1", "running"),
        Container(C2, "g1", "exited"),
        Container(C3, "g2", "running"),
    ]
    assert duplicate_containers(containers) == {"g1": [C1, C2]}


def test_records_disagree_with_docker_when_running_without_a_running_container() -> None:
    records = [
        Record("g1", "running", C1),
        Record("g2", "running", C2),
        Record("g3", "stopped", C3),
        Record("g4", "stopped", None),
        Record("g5", "stopped", "e" * 64),  # its container vanished: allowed
        Record("g6", "running", "f" * 64),
    ]
    containers = [
        Container(C1, "g1", "running"),
        Container(C2, "g2", "exited"),
        Container(C3, "g3", "running"),
    ]
    found = record_docker_disagreements(records, containers)
    assert found == [
        {"game_id": "g2", "record": "running", "container": "exited"},
        {"game_id": "g3", "record": "stopped", "container": "running"},
        {"game_id": "g6", "record": "running", "container": "missing"},
    ]


# -- answers -----------------------------------------------------------------------


def test_internal_unknown_and_unreadable_answers_are_counted_business_errors_are_not() -> None:
    calls = [
        Call("get", "OK"),
        Call("restart", "ABORTED", "conflict"),
        Call("patch", "FAILED_PRECONDITION", "container_start_failed"),
        Call("get", "UNAVAILABLE", "service_unavailable"),
        Call("get", "DEADLINE_EXCEEDED", "service_unavailable"),
        Call("get", "NOT_FOUND", "not_found"),
        Call("restart", "INTERNAL", "internal"),
        Call("patch", "UNKNOWN"),
        Call("get", "CLIENT_ERROR", unreadable=True),
    ]
    jobs = [start("1-0"), stop("2-0")]
    answers = [result(jobs[0], "failure", "internal"), result(jobs[1], "failure", "conflict")]
    assert internal_or_unknown(calls, answers) == {
        "gm_internal_or_unknown": 2,
        "gm_unreadable": 1,
        "job_internal": 1,
    }


# -- the watch feed ----------------------------------------------------------------


def test_a_watcher_that_got_every_stored_event_once_in_order_counts_nothing() -> None:
    check = check_watch(3, [4, 5, 7], [1, 2, 3, 4, 5, 7])
    assert (check.expected, check.received) == (3, 3)
    assert check.missing == check.repeated == check.unexpected == []
    assert check.out_of_order == 0


def test_missing_repeated_unexpected_and_out_of_order_events_are_counted() -> None:
    check = check_watch(3, [4, 6, 6, 5, 2, 99], [1, 2, 3, 4, 5, 6, 7])
    assert check.missing == [7]
    assert check.repeated == [6]
    assert check.unexpected == [2, 99]  # at or below the first cursor, or never stored
    assert check.out_of_order == 2  # 6 -> 5 and 5 -> 2


def test_a_watcher_that_never_subscribed_misses_everything() -> None:
    assert check_watch(None, [], [1, 2]).missing == [1, 2]


# -- the verdict -------------------------------------------------------------------


def _clean_run() -> dict[str, object]:
    jobs = [start("1-0"), stop("2-0"), start("3-0", "g2")]
    return {
        "jobs": jobs,
        "answers": [result(j) for j in jobs],
        "records": [Record("g1", "stopped", C1), Record("g2", "running", C2)],
        "containers": [Container(C1, "g1", "exited"), Container(C2, "g2", "running")],
        "calls": [Call("get", "OK")],
        "watch_first_cursor": 0,
        "watch_received": [1, 2, 3],
        "stored_event_ids": [1, 2, 3],
    }


def test_a_clean_run_passes_with_every_must_be_zero_count_at_zero() -> None:
    report = evaluate(**_clean_run())  # type: ignore[arg-type]
    assert report.ok, report.counts
    assert all(report.counts[name] == 0 for name in MUST_BE_ZERO)
    assert (report.counts["produced"], report.counts["answered"]) == (3, 3)
    assert "| dead_lettered | 0 | yes | ok |" in render_table(report)


def test_any_fault_fails_the_run_and_names_the_count() -> None:
    data = _clean_run()
    data["containers"] = [Container(C1, "g1", "exited"), Container(C2, "g2", "exited")]
    data["watch_received"] = [1, 3]
    report = evaluate(**data, replica_crashes=1)  # type: ignore[arg-type]
    assert not report.ok
    assert set(report.failed) == {
        "disagreeing_games",
        "record_docker_disagreements",
        "watch_missing",
        "replica_crashes",
    }
    assert "| watch_missing | 1 | yes | FAIL |" in render_table(report)
    assert report.details["watch"]["missing"] == [2]


def test_answer_delays_run_from_the_job_id_to_its_first_answer_id() -> None:
    jobs = [start("1000-0"), stop("1500-0")]
    answers = [result(jobs[0]), result(jobs[0]), result(jobs[1]), result(start("9-0"))]
    assert answer_delays(jobs, answers, ["3000-0", "2000-0", "62000-0", "9-1"]) == [1.0, 60.5]
    report = evaluate(**_clean_run(), answer_ids=["62001-0", "2-0", "4-0"])  # type: ignore[arg-type]
    assert report.counts["answered_after_60s"] == 1
    assert report.ok  # informational


def test_late_answers_say_when_they_were_sent_and_answered_after_a_kill_of_a_replica() -> None:
    # Sent at 100 s, 200 s and 300 s (entry ids are milliseconds); answered
    # 61.5 s, 30 s and 65 s later; a replica killed at 103 s.
    jobs = [start("100000-0"), stop("200000-0", "g2"), start("300000-0", "g3")]
    answers = [result(job) for job in jobs]
    answer_ids = ["161500-0", "230000-0", "365000-0"]
    late = late_answers(jobs, answers, answer_ids, kills_at=[103.0, 400.0])
    assert late == [
        {
            "game_id": "g1",
            "kind": "start",
            "job_id": "100000-0",
            "seconds": 61.5,
            "sent_after_kill_s": -3.0,
            "answered_after_kill_s": 58.5,
        },
        {
            "game_id": "g3",
            "kind": "start",
            "job_id": "300000-0",
            "seconds": 65.0,
            "sent_after_kill_s": 197.0,
            "answered_after_kill_s": 262.0,
        },
    ]
    assert [near_a_kill(item) for item in late] == [True, False]
    assert late_answers(jobs, answers, answer_ids, kills_at=[])[0]["sent_after_kill_s"] is None


def test_a_kill_explains_a_job_sent_while_its_leases_may_hold_and_answered_soon_after() -> None:
    def item(sent: float, answered: float) -> dict[str, object]:
        return {"sent_after_kill_s": sent, "answered_after_kill_s": answered}

    assert near_a_kill(item(12.6, 73.8))  # behind the dead lease, then the game's other jobs
    assert near_a_kill(item(-9.0, 55.0))
    assert not near_a_kill(item(47.1, 114.6))  # answered long after the dead leases expired
    assert not near_a_kill(item(61.0, 125.0))  # sent after they expired
    assert not near_a_kill({"sent_after_kill_s": None, "answered_after_kill_s": None})


def test_a_late_answer_no_kill_explains_is_counted_apart_but_informational() -> None:
    run = _clean_run()  # jobs sent 1-3 ms after the epoch; the first answered 62 s later
    counts = {
        kills: evaluate(**run, answer_ids=["62001-0", "2-0", "4-0"], kills_at=kills).counts  # type: ignore[arg-type]
        for kills in ((), (5.0,), (-40.0,))
    }
    assert [c["answered_after_60s"] for c in counts.values()] == [1, 1, 1]
    assert [c["answered_after_60s_not_near_a_kill"] for c in counts.values()] == [1, 0, 1]
    report = evaluate(**run, answer_ids=["62001-0", "2-0", "4-0"], kills_at=(-40.0,))  # type: ignore[arg-type]
    assert report.ok
    assert [item["job_id"] for item in report.details["answered_after_60s"]] == ["1-0"]
