-- 0006: the node a runtime's engine runs on.
--
-- A cluster backend (Docker Swarm, SPEC §10) places each game's engine on
-- one of several nodes; the record keeps the node's id and hostname as the
-- backend reported them when the engine was started or adopted. Both stay
-- NULL on the single-host backend and in rows of the Go service. The event
-- feed's copy of the record (runtime_events) carries them too.
-- Optional text columns hold NULL, never '' (as in 0001).

ALTER TABLE runtime_records
    ADD COLUMN node_id       text NULL,
    ADD COLUMN node_hostname text NULL,
    ADD CONSTRAINT runtime_records_node_id_not_empty
        CHECK (node_id IS NULL OR node_id <> ''),
    ADD CONSTRAINT runtime_records_node_hostname_not_empty
        CHECK (node_hostname IS NULL OR node_hostname <> ''),
    -- Mirrors RuntimeRecord.validate: a hostname names a node with an id.
    ADD CONSTRAINT runtime_records_node_hostname_with_id
        CHECK (node_hostname IS NULL OR node_id IS NOT NULL);

ALTER TABLE runtime_events
    ADD COLUMN node_id       text NULL,
    ADD COLUMN node_hostname text NULL;
