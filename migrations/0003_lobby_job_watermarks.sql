-- 0003: the newest Lobby job applied to each game (SPEC §4 "Lobby's last word wins").
--
-- Lobby's start and stop jobs of one game may be taken by different
-- replicas, reclaimed after a crash or redelivered. The watermark is the
-- newest job the service has applied to the game, written in the same
-- transaction as the record change it caused (or on its own when the job
-- changed nothing) and read under the game's lease: a job older than it is
-- answered `superseded` and changes nothing; the job itself, seen again
-- after a crash, is answered with the outcome stored here.
--
-- Jobs are ordered by entry id (milliseconds, then sequence) across both
-- job streams; `job_rank` breaks a tie of equal ids on the two streams
-- (0 start, 1 stop).

CREATE TABLE lobby_job_watermarks (
    game_id       text        NOT NULL,
    job_ms        bigint      NOT NULL,
    job_seq       bigint      NOT NULL,
    job_rank      smallint    NOT NULL,
    job_stream    text        NOT NULL,
    job_id        text        NOT NULL,
    outcome       text        NOT NULL,
    error_code    text        NULL,
    error_message text        NULL,
    operation_id  bigint      NULL,
    applied_at    timestamptz NOT NULL,

    CONSTRAINT lobby_job_watermarks_pkey PRIMARY KEY (game_id),
    CONSTRAINT lobby_job_watermarks_position
        CHECK (job_ms >= 0 AND job_seq >= 0 AND job_rank IN (0, 1)),
    CONSTRAINT lobby_job_watermarks_outcome_known
        CHECK (outcome IN ('success', 'failure')),
    CONSTRAINT lobby_job_watermarks_failure_has_code
        CHECK ((outcome = 'failure') = (error_code IS NOT NULL))
);
