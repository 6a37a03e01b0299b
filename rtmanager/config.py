"""Settings from `RTMANAGER_*` environment variables: the one place config is read.

Parsing and validation use pydantic; every bad value is reported
once, naming the variable, the value and what is expected (`ConfigError`).
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _parse_labels(value: object) -> object:
    if not isinstance(value, str):
        return value
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


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]
HostPort = Annotated[str, AfterValidator(_host_port)]
AbsolutePath = Annotated[Path, AfterValidator(_absolute_path)]


def default_instance_id() -> str:
    """This replica's default name: the host name, stable across restarts.

    It names the replica's stream consumer, so a restarted process takes
    back its own pending jobs; two replicas on one host need their own.
    """
    return socket.gethostname()


class Settings(BaseModel):
    """Every setting of the service, with developer-machine defaults."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    grpc_addr: HostPort = "127.0.0.1:50051"
    grpc_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Threads of the server's pool for the synchronous handlers (every RPC but
    # WatchRuntimes and reflection, which run on its event loop).
    grpc_max_workers: int = Field(default=64, ge=8, le=1024)
    # None: derived from the pool size (see `max_concurrent_rpcs`).
    grpc_max_concurrent_rpcs: int | None = Field(default=None, ge=1, le=1024)
    reflection: bool = True
    shutdown_grace: PositiveDuration = timedelta(seconds=30)

    postgres_dsn: str = Field(
        default="postgresql://rtmanager:rtmanager@127.0.0.1:5432/rtmanager", repr=False
    )
    postgres_schema: str = "rtmanager"
    postgres_pool_size: int = Field(default=10, ge=1, le=1000)
    migrations_dir: AbsolutePath = REPOSITORY_ROOT / "migrations"

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = ""

    start_jobs_stream: str = "runtime:start_jobs"
    stop_jobs_stream: str = "runtime:stop_jobs"
    job_results_stream: str = "runtime:job_results"
    dead_letter_stream: str = "runtime:dead_letter"
    stream_group: str = "rtmanager"
    stream_max_deliveries: int = Field(default=5, ge=1, le=1000)
    stream_workers: int = Field(default=4, ge=1, le=256)
    stream_claim_idle: PositiveDuration = timedelta(seconds=30)
    stream_block: PositiveDuration = timedelta(milliseconds=500)
    stream_batch: int = Field(default=64, ge=1, le=10_000)
    stream_max_buffered: int = Field(default=256, ge=1, le=100_000)
    stream_retry_base: PositiveDuration = timedelta(milliseconds=200)
    stream_retry_max: PositiveDuration = timedelta(seconds=5)
    stream_retry_for: PositiveDuration = timedelta(minutes=10)
    stream_results_maxlen: int = Field(default=100_000, ge=1)
    stream_dead_letter_maxlen: int = Field(default=100_000, ge=1)
    stream_presence_ttl: PositiveDuration = timedelta(seconds=10)
    stream_consumer_expiry: PositiveDuration = timedelta(hours=1)
    stream_answered_ttl: PositiveDuration = timedelta(hours=24)

    @property
    def stream_retry_window(self) -> timedelta:
        """How long a transiently failing Lobby job is retried: `RTMANAGER_STREAM_RETRY_FOR`,
        but never less than a dead holder's lease plus the wait before its job is taken over."""
        return max(self.stream_retry_for, self.game_lease_ttl + self.stream_claim_idle)

    instance_id: str = Field(default_factory=default_instance_id)
    cluster: str = "default"

    # Where engines run: one Docker host, or a Docker Swarm through a manager (SPEC §10).
    backend: Literal["docker", "swarm"] = "docker"
    docker_host: str = "unix:///var/run/docker.sock"
    # Swarm only: placement constraints of every engine service, and the
    # driver of each game's state volume.
    swarm_constraints: Annotated[list[str], BeforeValidator(_split_csv)] = []
    swarm_volume_driver: str = "local"
    docker_timeout: PositiveDuration = timedelta(seconds=30)
    engine_network: str = "galaxy-engines"
    engine_port: int = Field(default=8080, ge=1, le=65535)
    state_root: AbsolutePath = Path("/var/lib/galaxy/games")
    engine_state_mount: AbsolutePath = Path("/var/lib/galaxy-game")
    image_allowlist: Annotated[list[str], BeforeValidator(_split_csv)] = ["galaxy/"]
    image_pull_policy: PullPolicy = PullPolicy.IF_MISSING
    engine_memory: Annotated[int, BeforeValidator(parse_size), Field(ge=4 * 1024 * 1024)] = (
        512 * 1024 * 1024
    )
    engine_cpus: float = Field(default=1.0, gt=0, le=1024)
    engine_pids: int = Field(default=256, ge=16, le=1_000_000)
    engine_read_only: bool = False
    # nobody:nogroup on Debian: an unprivileged user that owns nothing else.
    engine_user: Annotated[EngineUser, BeforeValidator(parse_engine_user)] = EngineUser(
        65534, 65534
    )
    engine_log_max_size: Annotated[int, BeforeValidator(parse_size), Field(ge=64 * 1024)] = (
        10 * 1024 * 1024
    )
    engine_log_max_files: int = Field(default=3, ge=1, le=100)
    remove_state_on_cleanup: bool = False
    container_labels: Annotated[dict[str, str], BeforeValidator(_parse_labels)] = {}

    game_lease_ttl: PositiveDuration = timedelta(seconds=60)
    start_timeout: PositiveDuration = timedelta(seconds=30)
    start_settle: Duration = timedelta(seconds=1)
    stop_timeout: PositiveDuration = timedelta(seconds=10)
    container_ttl: PositiveDuration = timedelta(hours=24)
    cleanup_interval: PositiveDuration = timedelta(minutes=5)
    reconcile_interval: PositiveDuration = timedelta(seconds=60)

    auth_tokens: str = Field(default="", repr=False)
    # Tokens over plaintext on a non-loopback address are refused unless
    # the operator says the network is trusted (e.g. TLS ends at a sidecar).
    allow_cleartext_tokens: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    metrics_addr: Annotated[str, AfterValidator(_optional_host_port)] = "127.0.0.1:9464"
    otlp_endpoint: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = Field(
        default_factory=lambda: "text" if sys.stderr.isatty() else "json"
    )

    watch_max_subscribers: int = Field(default=32, ge=1, le=1000)
    watch_queue_size: int = Field(default=1000, ge=10, le=1_000_000)
    watch_heartbeat: PositiveDuration = timedelta(seconds=15)
    watch_retention: PositiveDuration = timedelta(days=7)

    @model_validator(mode="after")
    def _stream_timings_fit(self) -> Settings:
        problems = []
        if self.stream_block > REDIS_COMMAND_TIMEOUT - timedelta(seconds=1):
            problems.append(
                "RTMANAGER_STREAM_BLOCK must be at most "
                f"{(REDIS_COMMAND_TIMEOUT - timedelta(seconds=1)).total_seconds():g}s, "
                "below the Redis command timeout, or idle reads would time out"
            )
        if self.stream_retry_max < self.stream_retry_base:
            problems.append(
                "RTMANAGER_STREAM_RETRY_MAX must not be below RTMANAGER_STREAM_RETRY_BASE"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _concurrent_calls_have_threads(self) -> Settings:
        # A call admitted beyond the free server threads would queue unseen
        # in the executor instead of being answered RESOURCE_EXHAUSTED.
        room = self._rpc_threads
        if self.grpc_max_concurrent_rpcs is not None and self.grpc_max_concurrent_rpcs > room:
            raise ValueError(
                "RTMANAGER_GRPC_MAX_CONCURRENT_RPCS must be at most RTMANAGER_GRPC_MAX_WORKERS - "
                f"{RPC_THREAD_HEADROOM} ({room}), so every admitted call has a server thread"
            )
        return self

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

    @field_validator("swarm_constraints")
    @classmethod
    def _constraints(cls, value: list[str]) -> list[str]:
        for constraint in value:
            if _CONSTRAINT.fullmatch(constraint) is None:
                raise ValueError(
                    "expected comma-separated swarm constraints such as "
                    "node.labels.galaxy.engines==true or node.role!=manager"
                )
        return value

    @field_validator("swarm_volume_driver")
    @classmethod
    def _driver(cls, value: str) -> str:
        if _VOLUME_DRIVER.fullmatch(value) is None:
            raise ValueError("expected a volume driver name such as local")
        return value

    @field_validator("log_level", "log_format", "image_pull_policy", "backend", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("cluster", "stream_group", "engine_network")
    @classmethod
    def _name(cls, value: str) -> str:
        if _NAME.fullmatch(value) is None:
            raise ValueError("expected 1-63 characters of a-z, 0-9, '_', '.', '-'")
        return value

    @field_validator("postgres_schema")
    @classmethod
    def _schema(cls, value: str) -> str:
        if _SQL_IDENTIFIER.fullmatch(value) is None:
            raise ValueError("expected a lower-case SQL identifier (a-z, 0-9, '_')")
        return value

    @field_validator("image_allowlist")
    @classmethod
    def _allowlist(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("expected at least one repository prefix, e.g. galaxy/")
        return value

    @field_validator(
        "start_jobs_stream",
        "stop_jobs_stream",
        "job_results_stream",
        "dead_letter_stream",
        "instance_id",
        "postgres_dsn",
        "redis_url",
        "docker_host",
    )
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a non-empty value")
        return value


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings from `environ` (default: the process environment).

    Raises `ConfigError` listing every invalid variable with its value and
    what is expected.
    """
    source = os.environ if environ is None else environ
    names = [key for key in source if key.upper().startswith(ENV_PREFIX)]
    values: dict[str, Any] = {key[len(ENV_PREFIX) :].lower(): source[key] for key in names}
    values.update(overrides)
    known = set(Settings.model_fields)
    # Only `source` is read, so tests and production share one path. An
    # unknown RTMANAGER_* name is refused: a misspelt setting would
    # otherwise leave its default in force without a word.
    problems = [
        _unknown(name)
        for name in sorted(names)
        if name[len(ENV_PREFIX) :].lower() not in known and name.upper() not in NOT_SETTINGS
    ]
    try:
        settings = Settings.model_validate({k: v for k, v in values.items() if k in known})
    except ValidationError as error:
        problems.extend(_describe(error, values))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return settings


def setting_names() -> list[str]:
    """The variable name of every setting."""
    return [f"{ENV_PREFIX}{field.upper()}" for field in Settings.model_fields]


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


def _describe(error: ValidationError, values: dict[str, Any]) -> list[str]:
    lines = []
    for problem in error.errors():
        message = str(problem["msg"]).removeprefix("Value error, ")
        if not problem["loc"]:
            # A rule across several settings: its message names them.
            lines.append(message)
            continue
        field = str(problem["loc"][0])
        variable = f"{ENV_PREFIX}{field.upper()}"
        shown = values.get(field, problem.get("input"))
        known = Settings.model_fields.get(field)
        if known is not None and not known.repr:  # secrets: tokens, the DSN's password
            shown = "<redacted>"
        lines.append(f"{variable}={shown!r}: {message}")
    return lines
