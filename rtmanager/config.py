"""Settings from `RTMANAGER_*` environment variables: the one place config is read.

Each setting is a field of the frozen `Settings` dataclass with a parser
(`_PARSERS`) that turns the variable's text (or a typed value handed to
`load_settings`) into its value. Every bad value is reported once, naming
the variable, the value and what is expected (`ConfigError`); the rules
across settings are checked when every value is valid. (Plain code rather
than pydantic: the server's only use of pydantic was this model, and
importing and building it cost 8-10 MiB of the server's memory.)
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from rtmanager.ports import EngineUser, PullPolicy

ENV_PREFIX = "RTMANAGER_"
# Every Redis command's reply is awaited this long (blocking reads included).
REDIS_COMMAND_TIMEOUT = timedelta(seconds=5)
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^(\d+)([kmg]?)b?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_NAME = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$")
_SQL_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# A swarm placement constraint: an attribute, == or !=, a value (no commas).
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.-]+\s*(==|!=)\s*[^,\s]+$")
_VOLUME_DRIVER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./:-]{0,127}$")
_ENGINE_USER = re.compile(r"^(\d{1,10}):(\d{1,10})$")
# The largest id chown takes: (uid_t)-1 means "leave unchanged".
_MAX_ID = 2**32 - 2
# Server threads kept free of lifecycle calls, for health checks. (Watches
# and reflection run on the server's event loop and take no thread.)
RPC_THREAD_HEADROOM = 4
# Default concurrent lifecycle/read calls per pooled PostgreSQL connection: a
# call holds a connection only for its short transactions (loads, the
# commit), not while it waits on Docker or Redis, so several calls share one
# connection with waits far below the pool timeout.
CALLS_PER_CONNECTION = 8


# RTMANAGER_* variables that are deliberately not settings of the server:
# they are read by other programs of this repository and may be in the
# environment `rtmanager serve` or `migrate` inherits (an operator's shell,
# the test runner's), so they are not refused as unknown.
NOT_SETTINGS: Mapping[str, str] = {
    "RTMANAGER_CTL_ADDR": "rtmanager ctl: the server to call",
    "RTMANAGER_CTL_TOKEN": "rtmanager ctl: the bearer token to send",
    "RTMANAGER_TEST_POSTGRES_DSN": "tests: the PostgreSQL to test against",
    "RTMANAGER_TEST_REDIS_URL": "tests: the Redis to test against",
    "RTMANAGER_TEST_DOCKER_HOST": "tests: the Docker daemon to test against",
    "RTMANAGER_TEST_PG_BIN": "tests: PostgreSQL's binaries, for private servers",
    "RTMANAGER_TEST_RUN": "tests: the pytest run a process belongs to (set by the run itself)",
    "RTMANAGER_TEST_WORKERS": "scripts/test.sh: parallel pytest workers",
    "RTMANAGER_SOAK_SECONDS": "scripts/test.sh: length of the chaos soak (0 skips it)",
}


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists each of them."""


def parse_duration(value: object) -> timedelta:
    """Parse `500ms`, `30s`, `2m`, `1h30m`, `1d` (or a timedelta) into a timedelta."""
    if isinstance(value, timedelta):
        return value
    text = str(value).strip().lower()
    if text == "0":
        return timedelta(0)
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise ValueError("expected a duration such as 500ms, 30s, 2m, 1h30m or 1d")
    try:
        return timedelta(seconds=total)
    except OverflowError:
        raise ValueError("duration is too large") from None


def parse_size(value: object) -> int:
    """Parse a byte size such as `512m`, `1g` or `1048576` into bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if match is None:
        raise ValueError("expected a size such as 512m, 1g or a number of bytes")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_engine_user(value: object) -> EngineUser:
    """Parse a numeric `uid:gid` (or take an `EngineUser`)."""
    if isinstance(value, EngineUser):
        return value
    match = _ENGINE_USER.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(
            "expected a numeric uid:gid such as 65534:65534 (names are not accepted: "
            "they resolve inside each image, and the state directory is given to the ids)"
        )
    uid, gid = int(match.group(1)), int(match.group(2))
    if uid > _MAX_ID or gid > _MAX_ID:
        raise ValueError(f"expected ids of at most {_MAX_ID}")
    return EngineUser(uid, gid)


def _split_csv(value: object) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueError("Input should be a valid list")


def _parse_labels(value: object) -> dict[str, str]:
    if isinstance(value, Mapping):
        return {str(key): str(label) for key, label in value.items()}
    if not isinstance(value, str):
        raise ValueError("Input should be a valid dictionary")
    labels: dict[str, str] = {}
    for part in filter(None, (item.strip() for item in value.split(","))):
        key, sep, label = part.partition("=")
        if not sep or not key.strip():
            raise ValueError("expected comma-separated key=value pairs")
        labels[key.strip()] = label.strip()
    return labels


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("expected a duration greater than zero")
    return value


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected host:port, e.g. 127.0.0.1:50051")
    return value


def _optional_host_port(value: str) -> str:
    return _host_port(value) if value else value


def _absolute_path(value: Path) -> Path:
    if not value.is_absolute():
        raise ValueError("expected an absolute path")
    return value


def default_instance_id() -> str:
    """This replica's default name: the host name, stable across restarts.

    It names the replica's stream consumer, so a restarted process takes
    back its own pending jobs; two replicas on one host need their own.
    """
    return socket.gethostname()


_NOBODY = EngineUser(65534, 65534)


def _default_log_format() -> Literal["json", "text"]:
    return "text" if sys.stderr.isatty() else "json"


@dataclass(frozen=True)
class Settings:
    """Every setting of the service, with developer-machine defaults.

    Build it with `load_settings`, which parses and checks each value
    (`_PARSERS`) and the rules across settings (`_cross_checks`).
    """

    grpc_addr: str = "127.0.0.1:50051"
    grpc_max_message_bytes: int = 4 * 1024 * 1024
    # Threads of the server's pool for the synchronous handlers (every RPC but
    # WatchRuntimes, GetRuntime, ListRuntimes and reflection, which run on
    # its event loop).
    grpc_max_workers: int = 64
    # None: derived from the pool size (see `max_concurrent_rpcs`).
    grpc_max_concurrent_rpcs: int | None = None
    reflection: bool = True
    shutdown_grace: timedelta = timedelta(seconds=30)

    postgres_dsn: str = field(
        default="postgresql://rtmanager:rtmanager@127.0.0.1:5432/rtmanager", repr=False
    )
    postgres_schema: str = "rtmanager"
    postgres_pool_size: int = 10
    migrations_dir: Path = REPOSITORY_ROOT / "migrations"

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = ""

    start_jobs_stream: str = "runtime:start_jobs"
    stop_jobs_stream: str = "runtime:stop_jobs"
    job_results_stream: str = "runtime:job_results"
    dead_letter_stream: str = "runtime:dead_letter"
    stream_group: str = "rtmanager"
    stream_max_deliveries: int = 5
    stream_workers: int = 4
    stream_claim_idle: timedelta = timedelta(seconds=30)
    stream_block: timedelta = timedelta(milliseconds=500)
    stream_batch: int = 64
    stream_max_buffered: int = 256
    stream_retry_base: timedelta = timedelta(milliseconds=200)
    stream_retry_max: timedelta = timedelta(seconds=5)
    stream_retry_for: timedelta = timedelta(minutes=10)
    stream_results_maxlen: int = 100_000
    stream_dead_letter_maxlen: int = 100_000
    stream_presence_ttl: timedelta = timedelta(seconds=10)
    stream_consumer_expiry: timedelta = timedelta(hours=1)
    stream_answered_ttl: timedelta = timedelta(hours=24)

    instance_id: str = field(default_factory=default_instance_id)
    cluster: str = "default"

    # Where engines run: one Docker host, or a Docker Swarm through a manager (SPEC §10).
    backend: Literal["docker", "swarm"] = "docker"
    docker_host: str = "unix:///var/run/docker.sock"
    # Swarm only: placement constraints of every engine service, and the
    # driver of each game's state volume.
    swarm_constraints: list[str] = field(default_factory=list)
    swarm_volume_driver: str = "local"
    docker_timeout: timedelta = timedelta(seconds=30)
    # How long the health probe waits for each of Docker's answers (a network
    # listing included on one host; see the backends' `ping`), at most
    # `docker_timeout`.
    docker_probe_timeout: timedelta = timedelta(seconds=3)
    engine_network: str = "galaxy-engines"
    engine_port: int = 8080
    state_root: Path = Path("/var/lib/galaxy/games")
    engine_state_mount: Path = Path("/var/lib/galaxy-game")
    image_allowlist: list[str] = field(default_factory=lambda: ["galaxy/"])
    image_pull_policy: PullPolicy = PullPolicy.IF_MISSING
    engine_memory: int = 512 * 1024 * 1024
    engine_cpus: float = 1.0
    engine_pids: int = 256
    engine_read_only: bool = False
    # nobody:nogroup on Debian: an unprivileged user that owns nothing else.
    engine_user: EngineUser = _NOBODY
    engine_log_max_size: int = 10 * 1024 * 1024
    engine_log_max_files: int = 3
    remove_state_on_cleanup: bool = False
    container_labels: dict[str, str] = field(default_factory=dict)

    game_lease_ttl: timedelta = timedelta(seconds=60)
    start_timeout: timedelta = timedelta(seconds=30)
    start_settle: timedelta = timedelta(seconds=1)
    stop_timeout: timedelta = timedelta(seconds=10)
    container_ttl: timedelta = timedelta(hours=24)
    cleanup_interval: timedelta = timedelta(minutes=5)
    reconcile_interval: timedelta = timedelta(seconds=60)

    auth_tokens: str = field(default="", repr=False)
    # Tokens over plaintext on a non-loopback address are refused unless
    # the operator says the network is trusted (e.g. TLS ends at a sidecar).
    allow_cleartext_tokens: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    metrics_addr: str = "127.0.0.1:9464"
    otlp_endpoint: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = field(default_factory=_default_log_format)

    watch_max_subscribers: int = 32
    watch_queue_size: int = 1000
    watch_heartbeat: timedelta = timedelta(seconds=15)
    watch_retention: timedelta = timedelta(days=7)

    @property
    def stream_retry_window(self) -> timedelta:
        """How long a transiently failing Lobby job is retried: `RTMANAGER_STREAM_RETRY_FOR`,
        but never less than a dead holder's lease plus the wait before its job is taken over."""
        return max(self.stream_retry_for, self.game_lease_ttl + self.stream_claim_idle)

    @property
    def _rpc_threads(self) -> int:
        return self.grpc_max_workers - RPC_THREAD_HEADROOM

    @property
    def max_concurrent_rpcs(self) -> int:
        """How many unary RPCs may run at once; calls beyond it get RESOURCE_EXHAUSTED.

        `RTMANAGER_GRPC_MAX_CONCURRENT_RPCS` when set; otherwise
        `CALLS_PER_CONNECTION` per pooled PostgreSQL connection, at most the
        server threads less `RPC_THREAD_HEADROOM`.
        """
        if self.grpc_max_concurrent_rpcs is not None:
            return self.grpc_max_concurrent_rpcs
        return min(CALLS_PER_CONNECTION * self.postgres_pool_size, self._rpc_threads)

    @property
    def postgres_read_pool_size(self) -> int:
        """Connections of the event loop's read pool (`GetRuntime`, `ListRuntimes`).

        Half of `RTMANAGER_POSTGRES_POOL_SIZE` (rounded up), at least 2. The
        reads are one short statement each, awaited on one thread: a few
        connections keep that thread busy while others wait on PostgreSQL;
        more would only hold idle sessions. The connections are in addition
        to the pool of `RTMANAGER_POSTGRES_POOL_SIZE`.
        """
        return max(2, -(-self.postgres_pool_size // 2))


def _cross_checks(settings: Settings) -> list[str]:
    """The first rule across settings that does not hold, as a message naming its variables."""
    timings = []
    if settings.stream_block > REDIS_COMMAND_TIMEOUT - timedelta(seconds=1):
        timings.append(
            "RTMANAGER_STREAM_BLOCK must be at most "
            f"{(REDIS_COMMAND_TIMEOUT - timedelta(seconds=1)).total_seconds():g}s, "
            "below the Redis command timeout, or idle reads would time out"
        )
    if settings.stream_retry_max < settings.stream_retry_base:
        timings.append("RTMANAGER_STREAM_RETRY_MAX must not be below RTMANAGER_STREAM_RETRY_BASE")
    if timings:
        return ["; ".join(timings)]
    # A call admitted beyond the free server threads would queue unseen
    # in the executor instead of being answered RESOURCE_EXHAUSTED.
    room = settings._rpc_threads
    if settings.grpc_max_concurrent_rpcs is not None and settings.grpc_max_concurrent_rpcs > room:
        return [
            "RTMANAGER_GRPC_MAX_CONCURRENT_RPCS must be at most RTMANAGER_GRPC_MAX_WORKERS - "
            f"{RPC_THREAD_HEADROOM} ({room}), so every admitted call has a server thread"
        ]
    return []


# -- parsers: a variable's text (or a typed value) to a setting's value --------

Parser = Callable[[object], object]

# An integer, with underscores between digits, or with a fraction of zeros.
_INTEGER = re.compile(r"([+-]?\d+(?:_\d+)*)(?:\.0*)?")


def _integer(*, ge: int | None = None, le: int | None = None) -> Parser:
    def parse(value: object) -> int:
        number: int
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("Input should be a valid integer")
        if isinstance(value, int):
            number = value
        else:
            match = _INTEGER.fullmatch(value.strip())
            if match is None:
                raise ValueError(
                    "Input should be a valid integer, unable to parse string as an integer"
                )
            number = int(match.group(1))
        if ge is not None and number < ge:
            raise ValueError(f"Input should be greater than or equal to {ge}")
        if le is not None and number > le:
            raise ValueError(f"Input should be less than or equal to {le}")
        return number

    return parse


def _optional(parse: Parser) -> Parser:
    return lambda value: None if value is None else parse(value)


def _number(*, gt: float, le: float) -> Parser:
    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError("Input should be a valid number")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(
                "Input should be a valid number, unable to parse string as a number"
            ) from None
        if not number <= le:
            raise ValueError(f"Input should be less than or equal to {le:g}")
        if not number > gt:
            raise ValueError(f"Input should be greater than {gt:g}")
        return number

    return parse


_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower() if isinstance(value, str | int) else ""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("Input should be a valid boolean, unable to interpret input")


def _text(*checks: Callable[[str], str]) -> Parser:
    def parse(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("Input should be a valid string")
        for check in checks:
            value = check(value)
        return value

    return parse


def _choice(*choices: str) -> Parser:
    expected = ", ".join(f"{choice!r}" for choice in choices[:-1]) + f" or {choices[-1]!r}"

    def parse(value: object) -> str:
        text = value.strip().lower() if isinstance(value, str) else None
        if text not in choices:
            raise ValueError(f"Input should be {expected}")
        return text

    return parse


def _member(enum: type[StrEnum]) -> Parser:
    choose = _choice(*(member.value for member in enum))
    return lambda value: enum(str(choose(value)))


def _path(*checks: Callable[[Path], Path]) -> Parser:
    def parse(value: object) -> Path:
        if not isinstance(value, str | Path):
            raise ValueError("Input is not a valid path")
        path = Path(value)
        for check in checks:
            path = check(path)
        return path

    return parse


def _duration(value: object) -> timedelta:
    return parse_duration(value)


def _positive_duration(value: object) -> timedelta:
    return _positive(parse_duration(value))


def _size(*, ge: int) -> Parser:
    at_least = _integer(ge=ge)
    return lambda value: at_least(parse_size(value))


def _matching(pattern: re.Pattern[str], message: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if pattern.fullmatch(value) is None:
            raise ValueError(message)
        return value

    return check


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a non-empty value")
    return value


def _constraints(value: object) -> list[str]:
    constraints = _split_csv(value)
    for constraint in constraints:
        if _CONSTRAINT.fullmatch(constraint) is None:
            raise ValueError(
                "expected comma-separated swarm constraints such as "
                "node.labels.galaxy.engines==true or node.role!=manager"
            )
    return constraints


def _allowlist(value: object) -> list[str]:
    prefixes = _split_csv(value)
    if not prefixes:
        raise ValueError("expected at least one repository prefix, e.g. galaxy/")
    return prefixes


_NAME_RULE = _matching(_NAME, "expected 1-63 characters of a-z, 0-9, '_', '.', '-'")

_PARSERS: Mapping[str, Parser] = {
    "grpc_addr": _text(_host_port),
    "grpc_max_message_bytes": _integer(ge=1024, le=64 * 1024 * 1024),
    "grpc_max_workers": _integer(ge=8, le=1024),
    "grpc_max_concurrent_rpcs": _optional(_integer(ge=1, le=1024)),
    "reflection": _boolean,
    "shutdown_grace": _positive_duration,
    "postgres_dsn": _text(_not_blank),
    "postgres_schema": _text(
        _matching(_SQL_IDENTIFIER, "expected a lower-case SQL identifier (a-z, 0-9, '_')")
    ),
    "postgres_pool_size": _integer(ge=1, le=1000),
    "migrations_dir": _path(_absolute_path),
    "redis_url": _text(_not_blank),
    "redis_prefix": _text(),
    "start_jobs_stream": _text(_not_blank),
    "stop_jobs_stream": _text(_not_blank),
    "job_results_stream": _text(_not_blank),
    "dead_letter_stream": _text(_not_blank),
    "stream_group": _text(_NAME_RULE),
    "stream_max_deliveries": _integer(ge=1, le=1000),
    "stream_workers": _integer(ge=1, le=256),
    "stream_claim_idle": _positive_duration,
    "stream_block": _positive_duration,
    "stream_batch": _integer(ge=1, le=10_000),
    "stream_max_buffered": _integer(ge=1, le=100_000),
    "stream_retry_base": _positive_duration,
    "stream_retry_max": _positive_duration,
    "stream_retry_for": _positive_duration,
    "stream_results_maxlen": _integer(ge=1),
    "stream_dead_letter_maxlen": _integer(ge=1),
    "stream_presence_ttl": _positive_duration,
    "stream_consumer_expiry": _positive_duration,
    "stream_answered_ttl": _positive_duration,
    "instance_id": _text(_not_blank),
    "cluster": _text(_NAME_RULE),
    "backend": _choice("docker", "swarm"),
    "docker_host": _text(_not_blank),
    "swarm_constraints": _constraints,
    "swarm_volume_driver": _text(
        _matching(_VOLUME_DRIVER, "expected a volume driver name such as local")
    ),
    "docker_timeout": _positive_duration,
    "docker_probe_timeout": _positive_duration,
    "engine_network": _text(_NAME_RULE),
    "engine_port": _integer(ge=1, le=65535),
    "state_root": _path(_absolute_path),
    "engine_state_mount": _path(_absolute_path),
    "image_allowlist": _allowlist,
    "image_pull_policy": _member(PullPolicy),
    "engine_memory": _size(ge=4 * 1024 * 1024),
    "engine_cpus": _number(gt=0, le=1024),
    "engine_pids": _integer(ge=16, le=1_000_000),
    "engine_read_only": _boolean,
    "engine_user": parse_engine_user,
    "engine_log_max_size": _size(ge=64 * 1024),
    "engine_log_max_files": _integer(ge=1, le=100),
    "remove_state_on_cleanup": _boolean,
    "container_labels": _parse_labels,
    "game_lease_ttl": _positive_duration,
    "start_timeout": _positive_duration,
    "start_settle": _duration,
    "stop_timeout": _positive_duration,
    "container_ttl": _positive_duration,
    "cleanup_interval": _positive_duration,
    "reconcile_interval": _positive_duration,
    "auth_tokens": _text(),
    "allow_cleartext_tokens": _boolean,
    "tls_cert": _optional(_path()),
    "tls_key": _optional(_path()),
    "tls_client_ca": _optional(_path()),
    "metrics_addr": _text(_optional_host_port),
    "otlp_endpoint": _text(),
    "log_level": _choice("debug", "info", "warning", "error"),
    "log_format": _choice("json", "text"),
    "watch_max_subscribers": _integer(ge=1, le=1000),
    "watch_queue_size": _integer(ge=10, le=1_000_000),
    "watch_heartbeat": _positive_duration,
    "watch_retention": _positive_duration,
}

# Settings whose values are never shown: tokens, the DSN's password.
_SECRETS = frozenset(f.name for f in fields(Settings) if not f.repr)


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings from `environ` (default: the process environment).

    Raises `ConfigError` listing every invalid variable with its value and
    what is expected.
    """
    source = os.environ if environ is None else environ
    names = [key for key in source if key.upper().startswith(ENV_PREFIX)]
    values: dict[str, Any] = {key[len(ENV_PREFIX) :].lower(): source[key] for key in names}
    values.update(overrides)
    known = set(_PARSERS)
    # Only `source` is read, so tests and production share one path. An
    # unknown RTMANAGER_* name is refused: a misspelt setting would
    # otherwise leave its default in force without a word.
    problems = [
        _unknown(name)
        for name in sorted(names)
        if name[len(ENV_PREFIX) :].lower() not in known and name.upper() not in NOT_SETTINGS
    ]
    parsed: dict[str, Any] = {}
    for name, parse in _PARSERS.items():
        if name not in values:
            continue
        try:
            parsed[name] = parse(values[name])
        except ValueError as error:
            shown = "<redacted>" if name in _SECRETS else values[name]
            problems.append(f"{ENV_PREFIX}{name.upper()}={shown!r}: {error}")
    if not problems:
        settings = Settings(**parsed)
        problems.extend(_cross_checks(settings))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return settings


def setting_names() -> list[str]:
    """The variable name of every setting."""
    return [f"{ENV_PREFIX}{name.upper()}" for name in _PARSERS]


def _unknown(name: str) -> str:
    """The complaint about an unknown RTMANAGER_* variable, with the closest known name.

    Its value is not shown: it may be a secret meant for a misspelt setting.
    """
    suffix = name[len(ENV_PREFIX) :].upper()
    candidates = {known[len(ENV_PREFIX) :]: known for known in [*setting_names(), *NOT_SETTINGS]}
    close = difflib.get_close_matches(suffix, list(candidates), n=1)
    if close:
        return f"{name}: unknown variable; did you mean {candidates[close[0]]}?"
    return f"{name}: unknown variable (README.md lists every setting under Configuration)"
