-- 0004: the rtmanager cluster this schema belongs to (SPEC §6, one cluster per schema).
--
-- Records are not scoped by cluster, containers are: a deployment of
-- another RTMANAGER_CLUSTER pointed at this schema would see none of the
-- records' containers as its own and dispose of them on its first
-- reconcile pass. So a schema belongs to one cluster. `rtmanager migrate`
-- stamps the configured cluster here; a schema migrated without one is
-- claimed by the first cluster that migrates or serves it; a server of
-- any other cluster refuses to start, and its health is NOT_SERVING.
--
-- One row at most: the primary key is a boolean that can only be true.

CREATE TABLE schema_owner (
    singleton  boolean     NOT NULL DEFAULT true,
    cluster    text        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT schema_owner_pkey PRIMARY KEY (singleton),
    CONSTRAINT schema_owner_one_row CHECK (singleton),
    CONSTRAINT schema_owner_cluster_not_blank CHECK (btrim(cluster) <> '')
);
