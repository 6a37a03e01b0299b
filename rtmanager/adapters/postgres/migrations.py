"""Schema migrations: numbered SQL files applied once, in order, per schema.

Files in the migrations directory are named `NNNN_name.sql` (four digits,
numbered 1, 2, 3... without gaps). Their table names are unqualified: each
file runs with `search_path` set to the target schema, so one database can
hold several independent schemas (one per deployment, or per test).

`apply_migrations` runs everything in **one transaction** that first takes a
transaction-scoped advisory lock keyed on the schema name. Two replicas that
start at once therefore serialise: the second waits, then sees the versions
the first applied and has nothing left to do. Because PostgreSQL DDL is
transactional, an upgrade is all-or-nothing: a failing file leaves the schema
at the version it had before. (The price: a file cannot use statements that
refuse to run in a transaction, such as `CREATE INDEX CONCURRENTLY`.)

Applied versions are recorded in `schema_migrations` inside the target
schema. `check_schema_version` is what the server calls at startup: it
refuses a schema older or newer than the files it ships with.

A schema belongs to one rtmanager cluster (`schema_owner`, migration 0004):
records are not scoped by cluster, so a second cluster serving the same
schema would take the first one's records for records of vanished
containers and dispose of them. `apply_migrations(..., cluster=...)` stamps
the cluster in the same transaction as the upgrade; `check_schema_owner`,
called by the server at start-up and by its health checks, claims a schema
that carries no stamp yet and refuses one stamped by another cluster.
(Scoping every record query by cluster instead would let two clusters share
one schema silently, and would need the frozen tables shared with the Go
service to grow a cluster column: one schema per cluster is simpler and
says so loudly.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from rtmanager.adapters.postgres.pool import database_errors, validate_schema_name

MIGRATIONS_TABLE = "schema_migrations"
OWNER_TABLE = "schema_owner"
_FILE_NAME = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[a-z0-9][a-z0-9_]*)\.sql$")
# Distinguishes our advisory locks from any other user of the same database.
_LOCK_NAMESPACE = "rtmanager.migrate:"
# Seconds a connection attempt may take before the database counts as down.
CONNECT_TIMEOUT = 10


class MigrationError(RuntimeError):
    """Base of the migrator's errors."""


class MigrationFilesError(MigrationError):
    """The migrations directory is missing, or its files are misnamed or not contiguous."""


class SchemaVersionError(MigrationError):
    """The database schema is not at the version this rtmanager knows."""


class SchemaOwnerError(SchemaVersionError):
    """The database schema belongs to another rtmanager cluster.

    A `SchemaVersionError`, because the server treats both alike: this is
    not a schema it may serve, and waiting will not change that.
    """


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    path: Path

    def read(self) -> str:
        """Return the SQL of the file."""
        return self.path.read_text(encoding="utf-8")


def load_migrations(migrations_dir: Path) -> list[Migration]:
    """Return the migration files of `migrations_dir`, ordered by version.

    Files not ending in `.sql` are ignored. Raises `MigrationFilesError`
    when the directory does not exist, when a `.sql` file is not named
    `NNNN_name.sql`, when two files share a version, or when the versions do
    not run 1, 2, 3... without gaps.
    """
    directory = Path(migrations_dir)
    if not directory.is_dir():
        raise MigrationFilesError(f"migrations directory {directory} does not exist")
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise MigrationFilesError(
                f"migration file {path.name!r} in {directory} is misnamed: expected "
                "NNNN_name.sql (four digits, then lower-case letters, digits and '_')"
            )
        version = int(match.group("version"))
        if version == 0:
            raise MigrationFilesError(f"migration file {path.name!r}: versions start at 0001")
        if version in migrations:
            raise MigrationFilesError(
                f"migration files {migrations[version].path.name!r} and {path.name!r} "
                f"share version {version}"
            )
        migrations[version] = Migration(version, match.group("name"), path)
    ordered = [migrations[version] for version in sorted(migrations)]
    for expected, migration in enumerate(ordered, start=1):
        if migration.version != expected:
            raise MigrationFilesError(
                f"migration versions in {directory} have a gap: expected {expected:04d}, "
                f"found {migration.path.name!r}"
            )
    return ordered


def known_versions(migrations_dir: Path) -> list[int]:
    """Return the versions of the migration files, ascending (see `load_migrations`)."""
    return [migration.version for migration in load_migrations(migrations_dir)]


def apply_migrations(
    dsn: str, schema: str, migrations_dir: Path, *, cluster: str | None = None
) -> list[int]:
    """Bring `schema` up to the newest migration file; return the versions applied.

    Idempotent (an up-to-date schema yields `[]`) and safe to run from several
    processes at once (see the module docstring). Creates the schema when it
    is missing. With `cluster`, the schema is stamped as that cluster's in
    the same transaction (when it carries no stamp yet). Raises
    `MigrationFilesError` for a bad directory, `SchemaVersionError` when the
    schema already has versions newer than the files, `SchemaOwnerError`
    when it belongs to another cluster, `ServiceUnavailable` when PostgreSQL
    is unreachable, and the domain error of a failing file's statement
    otherwise (nothing is applied then).
    """
    validate_schema_name(schema)
    migrations = load_migrations(migrations_dir)
    newest = migrations[-1].version if migrations else 0
    schema_id = sql.Identifier(schema)
    applied: list[int] = []
    with (
        database_errors(f"migrate schema {schema}"),
        psycopg.connect(dsn, autocommit=False, connect_timeout=CONNECT_TIMEOUT) as conn,
    ):
        # psycopg's connection context commits on a clean exit and rolls
        # back on an exception: the whole upgrade is this one transaction.
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (_LOCK_NAMESPACE + schema,),
        )
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema_id))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(schema_id))
        conn.execute("SET LOCAL TimeZone TO 'UTC'")
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(MIGRATIONS_TABLE))
        )
        done = {
            row[0]
            for row in conn.execute(
                sql.SQL("SELECT version FROM {}").format(sql.Identifier(MIGRATIONS_TABLE))
            )
        }
        if done and max(done) > newest:
            raise SchemaVersionError(_newer_message(schema, max(done), newest))
        for migration in migrations:
            if migration.version in done:
                continue
            # Bytes: the file is trusted SQL shipped with the service; sent
            # without parameters, so it may hold several statements.
            conn.execute(migration.read().encode("utf-8"))
            conn.execute(
                sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(
                    sql.Identifier(MIGRATIONS_TABLE)
                ),
                (migration.version, migration.name),
            )
            applied.append(migration.version)
        if cluster is not None and _owner_table_exists(conn, schema):
            # A foreign cluster's migrate rolls back with everything above.
            _require_owner(schema, _claim(conn, schema, cluster), cluster)
    return applied


def check_schema_owner(
    conn_or_dsn: psycopg.Connection[Any] | str, schema: str, cluster: str
) -> str:
    """Return the schema's cluster when it is `cluster`, claiming an unstamped schema for it.

    Call it on a schema at the current version. Raises `SchemaOwnerError`
    with an operator-facing message when another cluster owns the schema.
    Given a connection that is idle, leaves it idle, its transaction
    committed so that a claim lasts.
    """
    validate_schema_name(schema)
    with database_errors(f"read the owner of schema {schema}"):
        if isinstance(conn_or_dsn, str):
            with psycopg.connect(
                conn_or_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            ) as conn:
                owner = _owner_or_claim(conn, schema, cluster)
        else:
            conn = conn_or_dsn
            was_idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            try:
                owner = _owner_or_claim(conn, schema, cluster)
            finally:
                if was_idle and not conn.autocommit and not conn.closed:
                    conn.commit()
    return _require_owner(schema, owner, cluster)


def _owner_table_exists(conn: psycopg.Connection[Any], schema: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
        (schema, OWNER_TABLE),
    ).fetchone()
    return row is not None and bool(row[0])


def _owner_or_claim(conn: psycopg.Connection[Any], schema: str, cluster: str) -> str:
    row = conn.execute(
        sql.SQL("SELECT cluster FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(OWNER_TABLE)
        )
    ).fetchone()
    if row is not None:
        return str(row[0])
    return _claim(conn, schema, cluster)


def _claim(conn: psycopg.Connection[Any], schema: str, cluster: str) -> str:
    """Stamp `cluster` unless a stamp exists; return the stamp (ours or the first claimer's)."""
    # ON CONFLICT waits for a concurrent claimer and then does nothing; the
    # SELECT that follows (a new snapshot) sees whoever won.
    conn.execute(
        sql.SQL("INSERT INTO {}.{} (cluster) VALUES (%s) ON CONFLICT DO NOTHING").format(
            sql.Identifier(schema), sql.Identifier(OWNER_TABLE)
        ),
        (cluster,),
    )
    row = conn.execute(
        sql.SQL("SELECT cluster FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(OWNER_TABLE)
        )
    ).fetchone()
    return str(row[0]) if row is not None else cluster


def _require_owner(schema: str, owner: str, cluster: str) -> str:
    if owner != cluster:
        raise SchemaOwnerError(
            f"PostgreSQL schema {schema!r} belongs to rtmanager cluster {owner!r}, not to "
            f"this deployment's cluster {cluster!r} (RTMANAGER_CLUSTER): a schema serves "
            "one cluster, whose records another cluster would dispose of; point "
            "RTMANAGER_POSTGRES_SCHEMA at a schema of this cluster's own"
        )
    return owner


def current_version(conn_or_dsn: psycopg.Connection[Any] | str, schema: str) -> int | None:
    """Return the newest version applied to `schema`: 0 when none, None without a migrations table.

    Given a connection, leaves it as it found it: an idle connection that is
    not in autocommit mode is rolled back after the read.
    """
    validate_schema_name(schema)
    with database_errors(f"read the schema version of {schema}"):
        if isinstance(conn_or_dsn, str):
            with psycopg.connect(
                conn_or_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            ) as conn:
                return _read_version(conn, schema)
        conn = conn_or_dsn
        was_idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        try:
            return _read_version(conn, schema)
        finally:
            if was_idle and not conn.autocommit and not conn.closed:
                conn.rollback()


def _read_version(conn: psycopg.Connection[Any], schema: str) -> int | None:
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
        (schema, MIGRATIONS_TABLE),
    ).fetchone()
    if row is None or not row[0]:
        return None
    row = conn.execute(
        sql.SQL("SELECT coalesce(max(version), 0) FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(MIGRATIONS_TABLE)
        )
    ).fetchone()
    return int(row[0]) if row is not None else 0


def check_schema_version(
    conn_or_dsn: psycopg.Connection[Any] | str, schema: str, migrations_dir: Path
) -> int:
    """Return the schema's version when it equals the newest migration file.

    Raises `SchemaVersionError` with an operator-facing message when the
    schema has no migrations table, or is older or newer than the files;
    `MigrationFilesError` when the directory is bad (or empty).
    """
    versions = known_versions(migrations_dir)
    if not versions:
        raise MigrationFilesError(f"no migration files in {migrations_dir}")
    newest = versions[-1]
    version = current_version(conn_or_dsn, schema)
    if version is None:
        raise SchemaVersionError(
            f"PostgreSQL schema {schema!r} has not been migrated (no {MIGRATIONS_TABLE} "
            f"table); run `rtmanager migrate` to create version {newest}"
        )
    if version < newest:
        raise SchemaVersionError(
            f"PostgreSQL schema {schema!r} is at version {version}, this rtmanager needs "
            f"version {newest}; run `rtmanager migrate`"
        )
    if version > newest:
        raise SchemaVersionError(_newer_message(schema, version, newest))
    return version


def _newer_message(schema: str, version: int, newest: int) -> str:
    return (
        f"PostgreSQL schema {schema!r} is at version {version}, newer than the newest "
        f"this rtmanager knows ({newest}): this rtmanager is older than the database "
        "schema; upgrade it"
    )
