"""Settings from RTMANAGER_* variables: SPEC §7 defaults and one clear message per bad value."""

from __future__ import annotations

import io
import os
import re
import socket
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from rtmanager import cli
from rtmanager.config import (
    NOT_SETTINGS,
    REPOSITORY_ROOT,
    ConfigError,
    load_settings,
    parse_duration,
    setting_names,
)
from rtmanager.ports import EngineUser, PullPolicy


@pytest.fixture(autouse=True)
def no_rtmanager_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the runner's own RTMANAGER_* variables out of these tests."""
    for name in list(os.environ):
        if name.upper().startswith("RTMANAGER_"):
            monkeypatch.delenv(name)
    yield


def config_error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return str(caught.value)


# --- defaults (SPEC §7) -------------------------------------------------------------


def test_defaults_are_the_spec_defaults() -> None:
    settings = load_settings({})

    assert settings.grpc_addr == "127.0.0.1:50051"
    assert settings.postgres_dsn.startswith("postgresql://")
    assert settings.postgres_pool_size == 10
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.redis_prefix == ""
    assert settings.start_jobs_stream == "runtime:start_jobs"
    assert settings.stop_jobs_stream == "runtime:stop_jobs"
    assert settings.job_results_stream == "runtime:job_results"
    assert settings.dead_letter_stream == "runtime:dead_letter"
    assert settings.stream_group == "rtmanager"
    assert settings.stream_max_deliveries == 5
    assert settings.cluster == "default"
    assert settings.docker_host == "unix:///var/run/docker.sock"
    assert settings.engine_network == "galaxy-engines"
    assert settings.engine_port == 8080
    assert settings.state_root == Path("/var/lib/galaxy/games")
    assert settings.engine_state_mount == Path("/var/lib/galaxy-game")
    assert settings.image_allowlist == ["galaxy/"]
    assert settings.image_pull_policy is PullPolicy.IF_MISSING
    assert settings.container_ttl == timedelta(hours=24)
    assert settings.cleanup_interval == timedelta(minutes=5)
    assert settings.reconcile_interval == timedelta(seconds=60)
    assert settings.auth_tokens == ""
    assert settings.tls_cert is None
    assert settings.tls_key is None
    assert settings.tls_client_ca is None
    assert settings.metrics_addr == "127.0.0.1:9464"
    assert settings.otlp_endpoint == ""
    assert settings.log_level == "info"


def test_sensible_defaults_are_positive_and_bounded() -> None:
    settings = load_settings({})

    for ttl in (settings.game_lease_ttl, settings.start_timeout, settings.stop_timeout):
        assert timedelta(0) < ttl <= timedelta(minutes=10)
    assert settings.engine_memory > 0
    assert settings.engine_cpus > 0
    assert settings.engine_pids > 0


def test_instance_id_defaults_to_the_host_name_so_a_restart_keeps_its_stream_consumer() -> None:
    assert load_settings({}).instance_id == socket.gethostname()


def test_stream_retry_window_outlasts_a_dead_holders_lease_and_the_claim_idle() -> None:
    short = load_settings(
        {
            "RTMANAGER_GAME_LEASE_TTL": "60s",
            "RTMANAGER_STREAM_CLAIM_IDLE": "30s",
            "RTMANAGER_STREAM_RETRY_FOR": "80s",
        }
    )
    assert short.stream_retry_window == timedelta(seconds=90)
    assert load_settings({}).stream_retry_window == timedelta(minutes=10)


def test_stream_block_must_stay_below_the_redis_command_timeout() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"RTMANAGER_STREAM_BLOCK": "5s"})
    assert (
        str(raised.value)
        .splitlines()[1]
        .strip()
        .startswith("RTMANAGER_STREAM_BLOCK must be at most 4s")
    )


def test_stream_settings_have_production_defaults() -> None:
    settings = load_settings({})
    assert settings.stream_retry_for == timedelta(minutes=10)
    assert settings.stream_block == timedelta(milliseconds=500)
    assert settings.stream_results_maxlen == 100_000
    assert settings.stream_dead_letter_maxlen == 100_000


def test_log_format_defaults_to_json_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert load_settings({}).log_format == "json"


def test_log_format_defaults_to_text_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert load_settings({}).log_format == "text"


def test_settings_are_read_from_the_given_variables() -> None:
    settings = load_settings(
        {
            "RTMANAGER_GRPC_ADDR": "0.0.0.0:6000",
            "RTMANAGER_REDIS_PREFIX": "staging:",
            "RTMANAGER_CLUSTER": "staging",
            "RTMANAGER_ENGINE_PORT": "9000",
            "RTMANAGER_IMAGE_PULL_POLICY": "ALWAYS",
            "RTMANAGER_ENGINE_MEMORY": "256m",
            "RTMANAGER_METRICS_ADDR": "",
        }
    )

    assert settings.grpc_addr == "0.0.0.0:6000"
    assert settings.redis_prefix == "staging:"
    assert settings.cluster == "staging"
    assert settings.engine_port == 9000
    assert settings.image_pull_policy is PullPolicy.ALWAYS
    assert settings.engine_memory == 256 * 1024 * 1024
    assert settings.metrics_addr == ""


# --- unknown variables ------------------------------------------------------------------


def test_a_misspelt_setting_is_refused_with_the_closest_name() -> None:
    message = config_error({"RTMANAGER_STOP_TIMOUT": "5s"})

    assert (
        "RTMANAGER_STOP_TIMOUT: unknown variable; did you mean RTMANAGER_STOP_TIMEOUT?" in message
    )


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("RTMANAGER_ENGINE_USR", "RTMANAGER_ENGINE_USER"),
        ("RTMANAGER_POSTGRES_DNS", "RTMANAGER_POSTGRES_DSN"),
        ("RTMANAGER_REMOVE_STATE_ON_CLEANUPS", "RTMANAGER_REMOVE_STATE_ON_CLEANUP"),
        ("RTMANAGER_ENGINE_LOG_MAX_FILE", "RTMANAGER_ENGINE_LOG_MAX_FILES"),
        ("RTMANAGER_CTL_TOKN", "RTMANAGER_CTL_TOKEN"),
    ],
)
def test_misspelt_settings_are_matched_to_what_was_meant(typo: str, meant: str) -> None:
    assert f"did you mean {meant}?" in config_error({typo: "x"})


def test_an_unknown_variable_without_a_close_name_points_to_the_settings_list() -> None:
    message = config_error({"RTMANAGER_NO_SUCH_SETTING": "whatever"})

    assert "RTMANAGER_NO_SUCH_SETTING: unknown variable" in message
    assert "did you mean" not in message
    assert "Configuration" in message


def test_the_value_of_an_unknown_variable_is_not_shown_as_it_may_be_a_secret() -> None:
    message = config_error({"RTMANAGER_AUTH_TOKEN": "admin=s3cret-token"})

    assert "did you mean RTMANAGER_AUTH_TOKENS?" in message
    assert "s3cret" not in message


def test_unknown_variables_are_reported_with_the_bad_values() -> None:
    message = config_error(
        {
            "RTMANAGER_STOP_TIMOUT": "5s",
            "RTMANAGER_CLUSTR": "prod",
            "RTMANAGER_ENGINE_PORT": "http",
        }
    )

    lines = message.splitlines()
    assert len(lines) == 4  # a heading and one line per problem
    assert "did you mean RTMANAGER_STOP_TIMEOUT?" in message
    assert "did you mean RTMANAGER_CLUSTER?" in message
    assert "RTMANAGER_ENGINE_PORT='http'" in message


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_serve_and_migrate_exit_2_naming_an_unknown_variable_before_doing_anything(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RTMANAGER_STOP_TIMOUT", "5s")

    def reached(_settings: object) -> int:
        pytest.fail(f"rtmanager {command} ran despite the unknown variable")

    monkeypatch.setattr(cli, f"_{command}", reached)

    assert cli.main([command]) == 2

    error = capsys.readouterr().err
    assert "RTMANAGER_STOP_TIMOUT: unknown variable; did you mean RTMANAGER_STOP_TIMEOUT?" in error


@pytest.mark.parametrize("name", sorted(NOT_SETTINGS))
def test_variables_of_the_client_and_the_test_scripts_are_not_refused(name: str) -> None:
    assert load_settings({name: "1"}).cluster == "default"


def test_every_rtmanager_name_in_the_repository_is_a_setting_or_deliberately_not_one() -> None:
    # Names spelt wrong on purpose, by the tests of the refusal.
    deliberately_unknown = {
        "RTMANAGER_AUTH_TOKEN",
        "RTMANAGER_CLUSTR",
        "RTMANAGER_CTL_TOKN",
        "RTMANAGER_ENGINE_LOG_MAX_FILE",
        "RTMANAGER_ENGINE_USR",
        "RTMANAGER_NO_SUCH_SETTING",
        "RTMANAGER_POSTGRES_DNS",
        "RTMANAGER_REMOVE_STATE_ON_CLEANUPS",
        "RTMANAGER_STOP_TIMOUT",
    }
    known = {*setting_names(), *NOT_SETTINGS}
    files = [
        path
        for path in REPOSITORY_ROOT.rglob("*")
        if path.is_file()
        and (path.suffix in {".py", ".sh", ".md", ".toml"} or path.name in {"Dockerfile", "run"})
        and not {".venv", ".git", "node_modules"} & set(path.relative_to(REPOSITORY_ROOT).parts)
    ]
    used = {
        name
        for path in files
        for name in re.findall(r"RTMANAGER_[A-Z0-9_]+", path.read_text(errors="replace"))
        # A family (`RTMANAGER_STREAM_*`) or the prefix itself is not a name.
        if not name.endswith("_")
    }

    assert len(files) > 50
    assert sorted(used - known - deliberately_unknown) == []
    assert "RTMANAGER_STOP_TIMEOUT" in used


def test_variables_without_the_prefix_are_ignored() -> None:
    assert load_settings({"CLUSTER": "Not Valid", "GRPC_ADDR": "nope"}).cluster == "default"


# --- durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("30s", timedelta(seconds=30)),
        ("2m", timedelta(minutes=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d", timedelta(days=1)),
        ("1.5s", timedelta(seconds=1.5)),
        ("1m30s500ms", timedelta(minutes=1, seconds=30, milliseconds=500)),
        (" 45S ", timedelta(seconds=45)),
    ],
)
def test_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert load_settings({"RTMANAGER_GAME_LEASE_TTL": text}).game_lease_ttl == expected


@pytest.mark.parametrize(
    "text",
    ["abc", "10", "-1s", "0s", "0", "", "1h 30m", "30 s", "1w", "s", "1.s", "30s!", "0ms"],
)
def test_bad_durations_name_the_variable_and_the_value(text: str) -> None:
    message = config_error({"RTMANAGER_GAME_LEASE_TTL": text})

    assert "RTMANAGER_GAME_LEASE_TTL" in message
    assert repr(text) in message
    assert "duration" in message


def test_zero_duration_is_explained_as_not_positive() -> None:
    assert "greater than zero" in config_error({"RTMANAGER_RECONCILE_INTERVAL": "0s"})


def test_every_duration_variable_is_validated() -> None:
    names = [
        "RTMANAGER_GAME_LEASE_TTL",
        "RTMANAGER_START_TIMEOUT",
        "RTMANAGER_STOP_TIMEOUT",
        "RTMANAGER_CONTAINER_TTL",
        "RTMANAGER_CLEANUP_INTERVAL",
        "RTMANAGER_RECONCILE_INTERVAL",
    ]
    message = config_error(dict.fromkeys(names, "soon"))

    for name in names:
        assert f"{name}='soon'" in message


def test_several_bad_variables_are_reported_in_one_error() -> None:
    message = config_error(
        {
            "RTMANAGER_GAME_LEASE_TTL": "abc",
            "RTMANAGER_STOP_TIMEOUT": "-1s",
            "RTMANAGER_ENGINE_PORT": "http",
            "RTMANAGER_CLUSTER": "Prod",
            "RTMANAGER_IMAGE_PULL_POLICY": "sometimes",
        }
    )

    for fragment in (
        "RTMANAGER_GAME_LEASE_TTL='abc'",
        "RTMANAGER_STOP_TIMEOUT='-1s'",
        "RTMANAGER_ENGINE_PORT='http'",
        "RTMANAGER_CLUSTER='Prod'",
        "RTMANAGER_IMAGE_PULL_POLICY='sometimes'",
    ):
        assert fragment in message
    assert len(message.splitlines()) == 6  # a heading and one line per variable


# --- lists and maps -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("galaxy/", ["galaxy/"]),
        (
            "galaxy/,registry.example.com:5000/galaxy/",
            ["galaxy/", "registry.example.com:5000/galaxy/"],
        ),
        (" galaxy/ , other/ ,, ", ["galaxy/", "other/"]),
    ],
)
def test_image_allowlist_is_comma_separated(text: str, expected: list[str]) -> None:
    assert load_settings({"RTMANAGER_IMAGE_ALLOWLIST": text}).image_allowlist == expected


@pytest.mark.parametrize("text", ["", " ", " , ,"])
def test_empty_image_allowlist_is_rejected(text: str) -> None:
    assert "RTMANAGER_IMAGE_ALLOWLIST" in config_error({"RTMANAGER_IMAGE_ALLOWLIST": text})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("team=galaxy", {"team": "galaxy"}),
        (" team = galaxy , env=prod ", {"team": "galaxy", "env": "prod"}),
        ("com.example/tier=games,empty=", {"com.example/tier": "games", "empty": ""}),
        ("query=a=b", {"query": "a=b"}),
    ],
)
def test_container_labels_are_comma_separated_pairs(text: str, expected: dict[str, str]) -> None:
    assert load_settings({"RTMANAGER_CONTAINER_LABELS": text}).container_labels == expected


@pytest.mark.parametrize("text", ["team", "=galaxy", "team=galaxy,env", " =x"])
def test_malformed_container_labels_are_rejected(text: str) -> None:
    message = config_error({"RTMANAGER_CONTAINER_LABELS": text})

    assert "RTMANAGER_CONTAINER_LABELS" in message
    assert "key=value" in message


# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "staging", "prod-eu_1.a", "a" * 63, "7"])
def test_valid_cluster_names_are_accepted(name: str) -> None:
    assert load_settings({"RTMANAGER_CLUSTER": name}).cluster == name


@pytest.mark.parametrize("name", ["", "Prod", "prod cluster", "-prod", "prod-", "a" * 64, "ü"])
def test_invalid_cluster_names_are_rejected(name: str) -> None:
    message = config_error({"RTMANAGER_CLUSTER": name})
    assert f"RTMANAGER_CLUSTER={name!r}" in message


@pytest.mark.parametrize("name", ["rtmanager", "rtmanager_test_1", "_private"])
def test_valid_schema_names_are_accepted(name: str) -> None:
    assert load_settings({"RTMANAGER_POSTGRES_SCHEMA": name}).postgres_schema == name


@pytest.mark.parametrize(
    "name", ["", "Public", "1schema", "my-schema", 'x"; DROP SCHEMA public; --', "a" * 64]
)
def test_invalid_schema_names_are_rejected(name: str) -> None:
    message = config_error({"RTMANAGER_POSTGRES_SCHEMA": name})
    assert "RTMANAGER_POSTGRES_SCHEMA" in message
    assert "SQL identifier" in message


@pytest.mark.parametrize("name", ["Galaxy", "engines net"])
def test_invalid_engine_network_names_are_rejected(name: str) -> None:
    assert "RTMANAGER_ENGINE_NETWORK" in config_error({"RTMANAGER_ENGINE_NETWORK": name})


# --- other values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RTMANAGER_GRPC_ADDR", "localhost"),
        ("RTMANAGER_GRPC_ADDR", "127.0.0.1:99999"),
        ("RTMANAGER_METRICS_ADDR", "9464"),
        ("RTMANAGER_ENGINE_PORT", "0"),
        ("RTMANAGER_ENGINE_PORT", "65536"),
        ("RTMANAGER_POSTGRES_POOL_SIZE", "0"),
        ("RTMANAGER_STREAM_MAX_DELIVERIES", "0"),
        ("RTMANAGER_STATE_ROOT", "relative/games"),
        ("RTMANAGER_ENGINE_STATE_MOUNT", "state"),
        ("RTMANAGER_ENGINE_MEMORY", "lots"),
        ("RTMANAGER_ENGINE_CPUS", "0"),
        ("RTMANAGER_LOG_LEVEL", "loud"),
        ("RTMANAGER_LOG_FORMAT", "xml"),
        ("RTMANAGER_REDIS_URL", "  "),
        ("RTMANAGER_DOCKER_PROBE_TIMEOUT", "0s"),
        ("RTMANAGER_DOCKER_PROBE_TIMEOUT", "soon"),
    ],
)
def test_bad_values_name_the_variable_and_the_value(variable: str, value: str) -> None:
    assert f"{variable}={value!r}" in config_error({variable: value})


def test_the_docker_health_probe_waits_a_few_seconds_unless_told_otherwise() -> None:
    assert load_settings({}).docker_probe_timeout == timedelta(seconds=3)
    settings = load_settings({"RTMANAGER_DOCKER_PROBE_TIMEOUT": "5s"})
    assert settings.docker_probe_timeout == timedelta(seconds=5)


# --- engine hardening -------------------------------------------------------------------


def test_engines_run_unprivileged_with_rotated_logs_by_default() -> None:
    settings = load_settings({})

    assert settings.engine_user == EngineUser(65534, 65534)
    assert settings.engine_log_max_size == 10 * 1024 * 1024
    assert settings.engine_log_max_files == 3
    assert settings.engine_read_only is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000:1000", EngineUser(1000, 1000)),
        (" 1000:50 ", EngineUser(1000, 50)),
        ("0:0", EngineUser(0, 0)),
        ("4294967294:4294967294", EngineUser(4294967294, 4294967294)),
    ],
)
def test_engine_user_is_a_numeric_uid_and_gid(text: str, expected: EngineUser) -> None:
    assert load_settings({"RTMANAGER_ENGINE_USER": text}).engine_user == expected


@pytest.mark.parametrize(
    "text",
    ["", "nobody", "nobody:nogroup", "1000", "1000:", ":1000", "-1:0", "1000:1000:1", "1e3:0"],
)
def test_engine_user_other_than_uid_colon_gid_is_refused(text: str) -> None:
    message = config_error({"RTMANAGER_ENGINE_USER": text})

    assert f"RTMANAGER_ENGINE_USER={text!r}" in message
    assert "numeric uid:gid" in message


def test_engine_user_ids_beyond_what_chown_takes_are_refused() -> None:
    message = config_error({"RTMANAGER_ENGINE_USER": "4294967295:0"})

    assert "RTMANAGER_ENGINE_USER='4294967295:0'" in message
    assert "at most 4294967294" in message


def test_engine_log_rotation_is_read_as_a_size_and_a_count() -> None:
    settings = load_settings(
        {"RTMANAGER_ENGINE_LOG_MAX_SIZE": "50m", "RTMANAGER_ENGINE_LOG_MAX_FILES": "5"}
    )

    assert settings.engine_log_max_size == 50 * 1024 * 1024
    assert settings.engine_log_max_files == 5


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RTMANAGER_ENGINE_LOG_MAX_SIZE", "lots"),
        ("RTMANAGER_ENGINE_LOG_MAX_SIZE", "0"),
        ("RTMANAGER_ENGINE_LOG_MAX_SIZE", "1k"),
        ("RTMANAGER_ENGINE_LOG_MAX_FILES", "0"),
        ("RTMANAGER_ENGINE_LOG_MAX_FILES", "101"),
        ("RTMANAGER_ENGINE_LOG_MAX_FILES", "few"),
    ],
)
def test_unbounded_or_malformed_engine_log_rotation_is_refused(variable: str, value: str) -> None:
    assert f"{variable}={value!r}" in config_error({variable: value})


# --- found while writing these tests (see the report) ---------------------------------


def test_given_environ_is_the_only_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTMANAGER_CLUSTER", "from-process-env")

    assert load_settings({}).cluster == "default"


def test_huge_duration_is_a_config_error() -> None:
    assert "RTMANAGER_CONTAINER_TTL" in config_error({"RTMANAGER_CONTAINER_TTL": "99999999999d"})


# --- shutdown, overload and exposure ---------------------------------------------------


def test_concurrent_rpcs_default_to_calls_per_pooled_connection_within_free_threads() -> None:
    assert load_settings({"RTMANAGER_POSTGRES_POOL_SIZE": "2"}).max_concurrent_rpcs == 16
    # 64 threads - 4 kept for health checks (watches take no thread).
    assert load_settings({}).max_concurrent_rpcs == 60
    roomy = load_settings({"RTMANAGER_GRPC_MAX_WORKERS": "200"})
    assert roomy.max_concurrent_rpcs == 80  # 8 per connection of the default pool of 10


def test_watchers_need_no_server_threads() -> None:
    settings = load_settings(
        {"RTMANAGER_WATCH_MAX_SUBSCRIBERS": "1000", "RTMANAGER_GRPC_MAX_WORKERS": "8"}
    )
    assert settings.watch_max_subscribers == 1000
    assert settings.max_concurrent_rpcs == 4


def test_concurrent_rpcs_can_be_set() -> None:
    settings = load_settings({"RTMANAGER_GRPC_MAX_CONCURRENT_RPCS": "5"})
    assert settings.max_concurrent_rpcs == 5


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_concurrent_rpcs_name_the_variable(value: str) -> None:
    message = config_error({"RTMANAGER_GRPC_MAX_CONCURRENT_RPCS": value})
    assert f"RTMANAGER_GRPC_MAX_CONCURRENT_RPCS={value!r}" in message


def test_concurrent_rpcs_beyond_the_free_server_threads_are_refused() -> None:
    message = config_error({"RTMANAGER_GRPC_MAX_CONCURRENT_RPCS": "61"})
    assert "RTMANAGER_GRPC_MAX_CONCURRENT_RPCS must be at most" in message
    assert "(60)" in message
    assert "RTMANAGER_?" not in message  # a rule across settings is reported as such


def test_cleartext_tokens_are_not_allowed_by_default() -> None:
    assert load_settings({}).allow_cleartext_tokens is False
    opted_in = load_settings({"RTMANAGER_ALLOW_CLEARTEXT_TOKENS": "true"})
    assert opted_in.allow_cleartext_tokens is True


def test_secrets_are_redacted_in_config_errors_but_other_values_are_shown() -> None:
    message = config_error(
        {"RTMANAGER_POSTGRES_DSN": "  ", "RTMANAGER_ALLOW_CLEARTEXT_TOKENS": "perhaps"}
    )
    assert "RTMANAGER_POSTGRES_DSN='<redacted>'" in message
    assert "RTMANAGER_ALLOW_CLEARTEXT_TOKENS='perhaps'" in message


def test_the_backend_is_docker_by_default_and_swarm_takes_its_own_settings() -> None:
    assert load_settings({}).backend == "docker"
    settings = load_settings(
        {
            "RTMANAGER_BACKEND": "Swarm",
            "RTMANAGER_SWARM_CONSTRAINTS": "node.labels.galaxy.engines==true, node.role!=manager",
            "RTMANAGER_SWARM_VOLUME_DRIVER": "rexray/ebs",
        }
    )
    assert settings.backend == "swarm"
    assert settings.swarm_constraints == ["node.labels.galaxy.engines==true", "node.role!=manager"]
    assert settings.swarm_volume_driver == "rexray/ebs"
    assert load_settings({}).swarm_constraints == []
    assert load_settings({}).swarm_volume_driver == "local"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RTMANAGER_BACKEND", "kubernetes"),
        ("RTMANAGER_SWARM_CONSTRAINTS", "node.labels.galaxy"),
        ("RTMANAGER_SWARM_CONSTRAINTS", "node.role=manager"),
        ("RTMANAGER_SWARM_VOLUME_DRIVER", "bad driver"),
    ],
)
def test_bad_backend_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


def test_the_composition_root_picks_the_backend_the_settings_name() -> None:
    from rtmanager.adapters.docker.engine import DockerEngineAdapter
    from rtmanager.adapters.swarm.engine import SwarmEngineAdapter
    from rtmanager.app import engine_backend

    docker_backend = engine_backend(load_settings({}))
    swarm_backend = engine_backend(load_settings({"RTMANAGER_BACKEND": "swarm"}))
    assert isinstance(docker_backend, DockerEngineAdapter)
    assert isinstance(swarm_backend, SwarmEngineAdapter)
    assert docker_backend.capabilities.host_state_dirs is True
    assert swarm_backend.capabilities.host_state_dirs is False
