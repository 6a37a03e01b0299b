"""The migrator and the schema it creates, against real PostgreSQL."""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from rtmanager.adapters.postgres.migrations import (
    MigrationFilesError,
    SchemaOwnerError,
    SchemaVersionError,
    apply_migrations,
    check_schema_owner,
    check_schema_version,
    current_version,
    known_versions,
)
from rtmanager.domain.errors import InternalError
from tests.conftest import POSTGRES_DSN

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def connect(schema: str) -> psycopg.Connection[tuple[object, ...]]:
    conn = psycopg.connect(POSTGRES_DSN, autocommit=True)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    return conn


def applied_rows(schema: str) -> list[tuple[object, ...]]:
    with connect(schema) as conn:
        return conn.execute(
            "SELECT version, name FROM schema_migrations ORDER BY version"
        ).fetchall()


@pytest.fixture
def unborn_schema() -> Iterator[str]:
    """A schema name that does not exist yet; dropped afterwards."""
    schema = f"t_unborn_{uuid.uuid4().hex[:10]}"
    yield schema
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def next_file(name: str) -> str:
    """The file name of a migration one version past the shipped ones."""
    return f"{known_versions(MIGRATIONS)[-1] + 1:04d}_{name}.sql"


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A private copy of the shipped migrations directory."""
    target = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, target)
    return target


# --- applying -------------------------------------------------------------


def test_migrate_is_idempotent(pg_schema: str) -> None:
    newest = known_versions(MIGRATIONS)
    assert apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS) == newest
    assert apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS) == []
    assert [row[0] for row in applied_rows(pg_schema)] == newest
    assert current_version(POSTGRES_DSN, pg_schema) == newest[-1]


def test_migrate_creates_a_missing_schema(unborn_schema: str) -> None:
    assert current_version(POSTGRES_DSN, unborn_schema) is None
    assert apply_migrations(POSTGRES_DSN, unborn_schema, MIGRATIONS) == known_versions(MIGRATIONS)
    assert (
        check_schema_version(POSTGRES_DSN, unborn_schema, MIGRATIONS)
        == (known_versions(MIGRATIONS)[-1])
    )


def test_concurrent_migrations_apply_each_version_exactly_once(unborn_schema: str) -> None:
    threads = 4
    barrier = threading.Barrier(threads)
    results: list[list[int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def migrate() -> None:
        barrier.wait()
        try:
            applied = apply_migrations(POSTGRES_DSN, unborn_schema, MIGRATIONS)
        except BaseException as error:  # pragma: no cover - reported below
            with lock:
                errors.append(error)
        else:
            with lock:
                results.append(applied)

    workers = [threading.Thread(target=migrate) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    assert errors == []
    assert sorted(results, key=len) == [[]] * (threads - 1) + [known_versions(MIGRATIONS)]
    assert [row[0] for row in applied_rows(unborn_schema)] == known_versions(MIGRATIONS)


def test_failed_upgrade_leaves_the_schema_untouched(pg_schema: str, migrations_copy: Path) -> None:
    (migrations_copy / next_file("broken")).write_text("CREATE TABLE broken (;\n")

    with pytest.raises(InternalError):
        apply_migrations(POSTGRES_DSN, pg_schema, migrations_copy)

    # One transaction: not even 0001 or the bookkeeping table survived.
    assert current_version(POSTGRES_DSN, pg_schema) is None


def test_migrate_refuses_a_schema_newer_than_the_files(pg_schema: str, tmp_path: Path) -> None:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    with connect(pg_schema) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'future')")

    with pytest.raises(SchemaVersionError, match="upgrade it"):
        apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)


# --- checking at startup --------------------------------------------------


def test_check_passes_on_a_current_schema(pg_schema: str) -> None:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    assert (
        check_schema_version(POSTGRES_DSN, pg_schema, MIGRATIONS) == known_versions(MIGRATIONS)[-1]
    )


def test_check_accepts_a_connection_and_leaves_it_idle(pg_schema: str) -> None:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    with psycopg.connect(POSTGRES_DSN) as conn:
        assert check_schema_version(conn, pg_schema, MIGRATIONS) == known_versions(MIGRATIONS)[-1]
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_check_refuses_an_unmigrated_schema(pg_schema: str) -> None:
    with pytest.raises(SchemaVersionError, match="run `rtmanager migrate`"):
        check_schema_version(POSTGRES_DSN, pg_schema, MIGRATIONS)


def test_check_refuses_a_schema_missing_the_newest_version(
    pg_schema: str, migrations_copy: Path
) -> None:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    shipped = known_versions(MIGRATIONS)[-1]
    (migrations_copy / next_file("extra")).write_text("CREATE TABLE extra (id int);\n")

    with pytest.raises(
        SchemaVersionError,
        match=rf"version {shipped}, .*needs version {shipped + 1}.*rtmanager migrate",
    ):
        check_schema_version(POSTGRES_DSN, pg_schema, migrations_copy)

    assert apply_migrations(POSTGRES_DSN, pg_schema, migrations_copy) == [shipped + 1]
    assert check_schema_version(POSTGRES_DSN, pg_schema, migrations_copy) == shipped + 1
    assert applied_rows(pg_schema)[-1] == (shipped + 1, "extra")


def test_check_refuses_a_schema_newer_than_known(pg_schema: str, tmp_path: Path) -> None:
    only_first = tmp_path / "migrations"
    only_first.mkdir()
    shutil.copy(MIGRATIONS / "0001_init.sql", only_first)
    apply_migrations(POSTGRES_DSN, pg_schema, only_first)
    with connect(pg_schema) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'future')")

    with pytest.raises(SchemaVersionError, match="older than the database schema; upgrade it"):
        check_schema_version(POSTGRES_DSN, pg_schema, only_first)


def test_schema_version_error_is_a_runtime_error() -> None:
    assert issubclass(SchemaVersionError, RuntimeError)


# --- one cluster per schema -------------------------------------------------


def owners(schema: str) -> list[tuple[object, ...]]:
    with connect(schema) as conn:
        return conn.execute("SELECT cluster FROM schema_owner").fetchall()


def test_migrate_stamps_the_schema_with_its_cluster(pg_schema: str) -> None:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS, cluster="prod")
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS, cluster="prod")
    assert owners(pg_schema) == [("prod",)]
    assert check_schema_owner(POSTGRES_DSN, pg_schema, "prod") == "prod"


def test_migrate_of_another_cluster_is_refused_and_changes_nothing(
    pg_schema: str, migrations_copy: Path
) -> None:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS, cluster="prod")
    shipped = known_versions(MIGRATIONS)[-1]
    (migrations_copy / next_file("extra")).write_text("CREATE TABLE extra (id int);\n")

    with pytest.raises(SchemaOwnerError, match=r"belongs to rtmanager cluster 'prod'.*'staging'"):
        apply_migrations(POSTGRES_DSN, pg_schema, migrations_copy, cluster="staging")

    assert current_version(POSTGRES_DSN, pg_schema) == shipped
    assert owners(pg_schema) == [("prod",)]


def test_a_schema_of_another_cluster_is_refused_like_a_wrong_version(pg_schema: str) -> None:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS, cluster="prod")
    with psycopg.connect(POSTGRES_DSN) as conn:
        with pytest.raises(SchemaVersionError, match="RTMANAGER_POSTGRES_SCHEMA"):
            check_schema_owner(conn, pg_schema, "staging")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert check_schema_owner(conn, pg_schema, "prod") == "prod"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert owners(pg_schema) == [("prod",)]


def test_an_unstamped_schema_is_claimed_by_the_first_cluster_that_checks_it(
    pg_schema: str,
) -> None:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)  # no cluster: no stamp
    assert owners(pg_schema) == []
    with psycopg.connect(POSTGRES_DSN) as conn:  # a pooled connection: autocommit off
        assert check_schema_owner(conn, pg_schema, "prod") == "prod"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert owners(pg_schema) == [("prod",)]  # committed
    with pytest.raises(SchemaOwnerError):
        check_schema_owner(POSTGRES_DSN, pg_schema, "staging")


def test_a_schema_upgraded_from_before_ownership_is_claimed_by_its_migrate(
    pg_schema: str, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for migration in sorted(MIGRATIONS.glob("000[1-3]_*.sql")):
        shutil.copy(migration, before)
    apply_migrations(POSTGRES_DSN, pg_schema, before, cluster="prod")  # no owner table yet

    assert apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS, cluster="prod")[0] == 4
    assert owners(pg_schema) == [("prod",)]


def test_an_operation_log_from_before_parents_upgrades_with_rows_naming_none(
    pg_schema: str, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for migration in sorted(MIGRATIONS.glob("000[1-4]_*.sql")):
        shutil.copy(migration, before)
    apply_migrations(POSTGRES_DSN, pg_schema, before)
    with connect(pg_schema) as conn:
        conn.execute(
            "INSERT INTO operation_log (game_id, op_kind, op_source, outcome, started_at)"
            " VALUES ('g1', 'stop', 'gm_rest', 'success', now())"
        )

    assert 5 in apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    with connect(pg_schema) as conn:
        assert conn.execute(
            "SELECT op_kind, parent_op_kind, parent_operation_id FROM operation_log"
        ).fetchall() == [("stop", None, None)]


def test_runtime_records_from_before_nodes_upgrade_with_no_node(
    pg_schema: str, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for migration in sorted(MIGRATIONS.glob("000[1-5]_*.sql")):
        shutil.copy(migration, before)
    apply_migrations(POSTGRES_DSN, pg_schema, before)
    with connect(pg_schema) as conn:
        _insert_record(conn, _record())

    assert apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS) == [6]
    with connect(pg_schema) as conn:
        assert conn.execute(
            "SELECT game_id, node_id, node_hostname FROM runtime_records"
        ).fetchall() == [("g1", None, None)]
        conn.execute(
            "INSERT INTO operation_log (game_id, op_kind, op_source, outcome, started_at)"
            " VALUES ('g1', 'start', 'gm_rest', 'success', now())"
        )
        conn.execute(
            "INSERT INTO runtime_events (operation_id, game_id, status, engine_endpoint,"
            " state_path, docker_network, last_op_at, created_at, node_id, node_hostname)"
            " SELECT max(id), 'g1', 'running', 'e', 's', 'n', now(), now(), 'node-1', 'w1'"
            " FROM operation_log"
        )


def test_concurrent_claims_of_two_clusters_leave_exactly_one_owner(pg_schema: str) -> None:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    clusters = ["blue", "green"] * 4
    barrier = threading.Barrier(len(clusters))
    won: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def claim(cluster: str) -> None:
        barrier.wait()
        try:
            check_schema_owner(POSTGRES_DSN, pg_schema, cluster)
        except SchemaOwnerError:
            with lock:
                refused.append(cluster)
        else:
            with lock:
                won.append(cluster)

    workers = [threading.Thread(target=claim, args=(c,)) for c in clusters]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    ((owner,),) = owners(pg_schema)
    assert sorted(won) == [owner] * 4
    assert len(refused) == 4 and owner not in refused


def test_the_owner_table_holds_one_row(pg_schema: str) -> None:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS, cluster="prod")
    with connect(pg_schema) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO schema_owner (cluster) VALUES ('staging')")
    with connect(pg_schema) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO schema_owner (singleton, cluster) VALUES (false, 'staging')")


# --- migration files ------------------------------------------------------


def test_known_versions_of_the_shipped_files() -> None:
    assert known_versions(MIGRATIONS) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["0001_init.sql", "2_second.sql"], "misnamed"),
        (["0001_init.sql", "0002_Upper.sql"], "misnamed"),
        (["0001_init.sql", "0003_third.sql"], "gap"),
        (["0002_second.sql"], "gap"),
        (["0000_zero.sql"], "start at 0001"),
        (["0001_init.sql", "0001_again.sql"], "share version 1"),
    ],
)
def test_known_versions_rejects_bad_file_names(
    tmp_path: Path, names: list[str], message: str
) -> None:
    for name in names:
        (tmp_path / name).write_text("SELECT 1;\n")
    with pytest.raises(MigrationFilesError, match=message):
        known_versions(tmp_path)


def test_known_versions_ignores_other_files(tmp_path: Path) -> None:
    (tmp_path / "0001_init.sql").write_text("SELECT 1;\n")
    (tmp_path / "README.md").write_text("notes\n")
    assert known_versions(tmp_path) == [1]


def test_known_versions_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(MigrationFilesError, match="does not exist"):
        known_versions(tmp_path / "nowhere")


# --- the schema's CHECK constraints back up the domain rules ---------------

_RECORD_COLUMNS = (
    "game_id, status, current_container_id, current_image_ref, engine_endpoint, state_path,"
    " docker_network, started_at, stopped_at, removed_at, last_op_at, created_at"
)
_NODE_COLUMNS = ("node_id", "node_hostname")
_T0 = "2025-01-01 00:00:00+00"
_T1 = "2025-01-01 00:01:00+00"


def _record(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "game_id": "g1",
        "status": "running",
        "current_container_id": "c1",
        "current_image_ref": "galaxy/engine:1.0.0",
        "engine_endpoint": "http://galaxy-game-g1:8080",
        "state_path": "/var/lib/galaxy/games/g1",
        "docker_network": "galaxy-engines",
        "started_at": _T0,
        "stopped_at": None,
        "removed_at": None,
        "last_op_at": _T1,
        "created_at": _T0,
    }
    row.update(overrides)
    return row


def _operation(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "game_id": "g1",
        "op_kind": "start",
        "op_source": "gm_rest",
        "outcome": "success",
        "error_code": None,
        "started_at": _T0,
        "finished_at": _T1,
    }
    row.update(overrides)
    return row


def _insert_record(conn: psycopg.Connection[tuple[object, ...]], row: dict[str, object]) -> None:
    # The node columns (0006) only when the row sets them: older schemas lack them.
    nodes = [column for column in _NODE_COLUMNS if column in row]
    conn.execute(
        "INSERT INTO runtime_records ("
        + _RECORD_COLUMNS
        + "".join(f", {column}" for column in nodes)
        + ") VALUES ("
        "%(game_id)s, %(status)s, %(current_container_id)s, %(current_image_ref)s,"
        " %(engine_endpoint)s, %(state_path)s, %(docker_network)s, %(started_at)s,"
        " %(stopped_at)s, %(removed_at)s, %(last_op_at)s, %(created_at)s"
        + "".join(f", %({column})s" for column in nodes)
        + ")",
        row,
    )


def _insert_operation(conn: psycopg.Connection[tuple[object, ...]], row: dict[str, object]) -> None:
    conn.execute(
        "INSERT INTO operation_log (game_id, op_kind, op_source, outcome, error_code,"
        " started_at, finished_at) VALUES (%(game_id)s, %(op_kind)s, %(op_source)s,"
        " %(outcome)s, %(error_code)s, %(started_at)s, %(finished_at)s)",
        row,
    )


@pytest.fixture
def migrated_conn(pg_schema: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    apply_migrations(POSTGRES_DSN, pg_schema, MIGRATIONS)
    with connect(pg_schema) as conn:
        yield conn


def test_valid_raw_rows_are_accepted(migrated_conn: psycopg.Connection[tuple[object, ...]]) -> None:
    _insert_record(migrated_conn, _record())
    _insert_record(
        migrated_conn,
        _record(game_id="g2", status="stopped", current_container_id=None, stopped_at=_T1),
    )
    _insert_record(
        migrated_conn,
        _record(game_id="g3", status="removed", current_container_id=None, removed_at=_T1),
    )
    _insert_record(migrated_conn, _record(game_id="g4", node_id="node-1", node_hostname="w1"))
    _insert_record(migrated_conn, _record(game_id="g5", node_id="node-1", node_hostname=None))
    _insert_operation(migrated_conn, _operation())
    _insert_operation(migrated_conn, _operation(outcome="failure", error_code="conflict"))


@pytest.mark.parametrize(
    ("overrides", "constraint"),
    [
        ({"current_container_id": None}, "runtime_records_running_fields"),
        ({"current_image_ref": None}, "runtime_records_running_fields"),
        ({"started_at": None}, "runtime_records_running_fields"),
        ({"status": "stopped", "stopped_at": None}, "runtime_records_stopped_fields"),
        (
            {"status": "stopped", "stopped_at": _T1, "current_image_ref": None},
            "runtime_records_stopped_fields",
        ),
        ({"status": "removed", "removed_at": None}, "runtime_records_removed_fields"),
        ({"status": "paused"}, "runtime_records_status_known"),
        ({"game_id": "Bad_Id"}, "runtime_records_game_id_format"),
        ({"game_id": "-g"}, "runtime_records_game_id_format"),
        ({"game_id": "g" * 52}, "runtime_records_game_id_format"),
        ({"engine_endpoint": "  "}, "runtime_records_engine_endpoint_not_blank"),
        ({"state_path": ""}, "runtime_records_state_path_not_blank"),
        ({"docker_network": ""}, "runtime_records_docker_network_not_blank"),
        ({"current_container_id": ""}, "runtime_records_container_id_not_empty"),
        ({"last_op_at": "2024-12-31 23:59:59+00"}, "runtime_records_last_op_after_created"),
        ({"started_at": "2024-12-31 23:59:59+00"}, "runtime_records_started_after_created"),
        ({"stopped_at": "2024-12-31 23:59:59+00"}, "runtime_records_stopped_after_started"),
        ({"removed_at": "2024-12-31 23:59:59+00"}, "runtime_records_removed_after_created"),
        ({"node_id": ""}, "runtime_records_node_id_not_empty"),
        ({"node_id": "node-1", "node_hostname": ""}, "runtime_records_node_hostname_not_empty"),
        ({"node_id": None, "node_hostname": "w1"}, "runtime_records_node_hostname_with_id"),
    ],
)
def test_runtime_records_checks_reject_rule_breaking_rows(
    migrated_conn: psycopg.Connection[tuple[object, ...]],
    overrides: dict[str, object],
    constraint: str,
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        _insert_record(migrated_conn, _record(**overrides))
    assert caught.value.diag.constraint_name == constraint


@pytest.mark.parametrize(
    ("overrides", "constraint"),
    [
        ({"outcome": "failure"}, "operation_log_error_code_matches_outcome"),
        (
            {"outcome": "success", "error_code": "conflict"},
            "operation_log_error_code_matches_outcome",
        ),
        ({"outcome": "failure", "error_code": "oops"}, "operation_log_error_code_known"),
        ({"op_kind": "explode"}, "operation_log_op_kind_known"),
        ({"op_source": "cron"}, "operation_log_op_source_known"),
        ({"outcome": "maybe"}, "operation_log_outcome_known"),
        ({"game_id": " "}, "operation_log_game_id_not_blank"),
        ({"finished_at": "2024-12-31 23:59:59+00"}, "operation_log_finished_after_started"),
    ],
)
def test_operation_log_checks_reject_rule_breaking_rows(
    migrated_conn: psycopg.Connection[tuple[object, ...]],
    overrides: dict[str, object],
    constraint: str,
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        _insert_operation(migrated_conn, _operation(**overrides))
    assert caught.value.diag.constraint_name == constraint
