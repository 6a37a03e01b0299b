-- 0001: runtime records and the operation log.
--
-- Table names are unqualified: the migrator runs this file with
-- `search_path` set to the target schema. The CHECK constraints mirror
-- `RuntimeRecord.validate` and `OperationEntry.validate` (rtmanager/domain)
-- so that a row written by any client, including the original Go service,
-- keeps the domain invariants. Optional text columns hold NULL, never ''.

CREATE TABLE runtime_records (
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

    CONSTRAINT runtime_records_pkey PRIMARY KEY (game_id),
    CONSTRAINT runtime_records_game_id_format
        CHECK (game_id ~ '^[a-z0-9]([a-z0-9-]{0,49}[a-z0-9])?$'),
    CONSTRAINT runtime_records_status_known
        CHECK (status IN ('running', 'stopped', 'removed')),
    CONSTRAINT runtime_records_container_id_not_empty
        CHECK (current_container_id IS NULL OR current_container_id <> ''),
    CONSTRAINT runtime_records_image_ref_not_empty
        CHECK (current_image_ref IS NULL OR current_image_ref <> ''),
    CONSTRAINT runtime_records_engine_endpoint_not_blank
        CHECK (engine_endpoint ~ '[^[:space:]]'),
    CONSTRAINT runtime_records_state_path_not_blank
        CHECK (state_path ~ '[^[:space:]]'),
    CONSTRAINT runtime_records_docker_network_not_blank
        CHECK (docker_network ~ '[^[:space:]]'),
    -- Required fields per status. coalesce(): a NULL operand would make the
    -- whole expression NULL, which a CHECK lets through.
    CONSTRAINT runtime_records_running_fields CHECK (
        status <> 'running' OR (
            coalesce(current_container_id, '') ~ '[^[:space:]]'
            AND coalesce(current_image_ref, '') ~ '[^[:space:]]'
            AND started_at IS NOT NULL
        )
    ),
    CONSTRAINT runtime_records_stopped_fields CHECK (
        status <> 'stopped' OR (
            coalesce(current_image_ref, '') ~ '[^[:space:]]'
            AND stopped_at IS NOT NULL
        )
    ),
    CONSTRAINT runtime_records_removed_fields CHECK (
        status <> 'removed' OR removed_at IS NOT NULL
    ),
    -- Time ordering.
    CONSTRAINT runtime_records_last_op_after_created
        CHECK (last_op_at >= created_at),
    CONSTRAINT runtime_records_started_after_created
        CHECK (started_at IS NULL OR started_at >= created_at),
    CONSTRAINT runtime_records_stopped_after_started
        CHECK (stopped_at IS NULL OR started_at IS NULL OR stopped_at >= started_at),
    CONSTRAINT runtime_records_removed_after_created
        CHECK (removed_at IS NULL OR removed_at >= created_at)
);

-- "Every record of one status, by game id" (list_by_status, filtered list).
CREATE INDEX runtime_records_status_game_id_idx ON runtime_records (status, game_id);
-- "Stopped records idle since before a cutoff" (the cleanup TTL worker).
CREATE INDEX runtime_records_status_last_op_at_idx ON runtime_records (status, last_op_at);


CREATE TABLE operation_log (
    id            bigserial   NOT NULL,
    game_id       text        NOT NULL,
    op_kind       text        NOT NULL,
    op_source     text        NOT NULL,
    source_ref    text        NULL,
    image_ref     text        NULL,
    container_id  text        NULL,
    outcome       text        NOT NULL,
    error_code    text        NULL,
    error_message text        NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NULL,

    CONSTRAINT operation_log_pkey PRIMARY KEY (id),
    CONSTRAINT operation_log_game_id_not_blank
        CHECK (game_id ~ '[^[:space:]]'),
    CONSTRAINT operation_log_op_kind_known CHECK (op_kind IN (
        'start', 'stop', 'restart', 'patch',
        'cleanup_container', 'reconcile_adopt', 'reconcile_dispose'
    )),
    CONSTRAINT operation_log_op_source_known CHECK (op_source IN (
        'lobby_stream', 'gm_rest', 'admin_rest', 'auto_ttl', 'auto_reconcile'
    )),
    CONSTRAINT operation_log_outcome_known
        CHECK (outcome IN ('success', 'failure')),
    -- A failure carries exactly one stable error code; a success carries none.
    CONSTRAINT operation_log_error_code_known CHECK (error_code IS NULL OR error_code IN (
        'invalid_request', 'not_found', 'conflict', 'semver_patch_only',
        'image_not_allowed', 'image_pull_failed', 'container_start_failed',
        'service_unavailable', 'internal'
    )),
    CONSTRAINT operation_log_error_code_matches_outcome
        CHECK ((outcome = 'failure') = (error_code IS NOT NULL)),
    CONSTRAINT operation_log_finished_after_started
        CHECK (finished_at IS NULL OR finished_at >= started_at)
);

-- One game's history, newest first: WHERE game_id = $1 ORDER BY id DESC
-- (a backward scan of this index). The unfiltered newest-first listing is a
-- backward scan of the primary key.
CREATE INDEX operation_log_game_id_id_idx ON operation_log (game_id, id);
-- Time-range listings (since / until bound started_at).
CREATE INDEX operation_log_started_at_idx ON operation_log (started_at);
