-- 0002: the runtime event feed behind WatchRuntimes (a transactional outbox).
--
-- One row per committed record change, written in the same transaction as
-- the change and its operation-log row. Rows are inserted under a
-- transaction-scoped advisory lock taken just before the insert, so ids are
-- assigned in commit order and a reader that follows ids never skips a row
-- committed late. Each insert also sends pg_notify on a per-schema channel;
-- listeners re-read by id, so a lost notification delays nothing for long.
-- The record columns mirror runtime_records (the record after the change).

CREATE TABLE runtime_events (
    id                   bigserial   NOT NULL,
    operation_id         bigint      NOT NULL,
    committed_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    game_id              text        NOT NULL,
    status               text        NOT NULL,
    current_container_id text        NULL,
    current_image_ref    text        NULL,
    engine_endpoint      text        NOT NULL,
    state_path           text        NOT NULL,
    docker_network       text        NOT NULL,
    started_at           timestamptz NULL,
    stopped_at           timestamptz NULL,
    removed_at           timestamptz NULL,
    last_op_at           timestamptz NOT NULL,
    created_at           timestamptz NOT NULL,

    CONSTRAINT runtime_events_pkey PRIMARY KEY (id),
    CONSTRAINT runtime_events_operation_fkey
        FOREIGN KEY (operation_id) REFERENCES operation_log (id),
    CONSTRAINT runtime_events_status_known
        CHECK (status IN ('running', 'stopped', 'removed'))
);

CREATE INDEX runtime_events_committed_at ON runtime_events (committed_at);

-- Everything up to and including `pruned_through` has been deleted by
-- retention; a cursor below it can no longer be resumed from.
CREATE TABLE runtime_event_retention (
    singleton      boolean NOT NULL DEFAULT true,
    pruned_through bigint  NOT NULL DEFAULT 0,
    CONSTRAINT runtime_event_retention_pkey PRIMARY KEY (singleton),
    CONSTRAINT runtime_event_retention_singleton CHECK (singleton)
);

INSERT INTO runtime_event_retention (singleton, pruned_through) VALUES (true, 0);
