-- 0005: an inner step names the composite operation it belongs to.
--
-- A restart or patch runs an inner stop and an inner start, a forced
-- cleanup an inner stop; each inner step commits its own row before the
-- outer row is appended. So that each inner row can name its parent, the
-- outer row's id is drawn from this table's sequence when its first inner
-- step begins, and the outer row is inserted with that id at the end.
-- (The outer row's id is therefore lower than its inner rows' ids.)
--
-- No foreign key: the parent row commits after its inner rows, and never
-- if the process dies in between. The event feed reads these columns, with
-- source_ref, through its join on operation_log, so a watcher can tell a
-- restart's transient stop from a game that ended. Rows of the Go service
-- leave both NULL.

ALTER TABLE operation_log
    ADD COLUMN parent_op_kind      text   NULL,
    ADD COLUMN parent_operation_id bigint NULL,
    ADD CONSTRAINT operation_log_parent_op_kind_known CHECK (
        parent_op_kind IS NULL OR parent_op_kind IN ('restart', 'patch', 'cleanup_container')
    ),
    -- Both or neither; only stops and starts are inner steps.
    ADD CONSTRAINT operation_log_parent_complete
        CHECK ((parent_op_kind IS NULL) = (parent_operation_id IS NULL)),
    ADD CONSTRAINT operation_log_parent_of_inner_step
        CHECK (parent_op_kind IS NULL OR op_kind IN ('start', 'stop')),
    ADD CONSTRAINT operation_log_parent_not_self
        CHECK (parent_operation_id IS NULL OR parent_operation_id <> id);
