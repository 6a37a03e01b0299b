"""The composition root: builds adapters, use cases, servicers and the server.

Nothing else in the project constructs adapters; everything receives its
collaborators from here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import grpc

from rtmanager.adapters.docker.engine import DockerEngineAdapter
from rtmanager.adapters.instrumented import InstrumentedBackend
from rtmanager.adapters.postgres.event_feed import PostgresRuntimeFeed
from rtmanager.adapters.postgres.loop_reads import PostgresRecordReader
from rtmanager.adapters.postgres.migrations import (
    SchemaVersionError,
    check_schema_owner,
    check_schema_version,
)
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.adapters.redis.client import create_redis
from rtmanager.adapters.redis.job_streams import JobStreamsConfig, RedisJobStreams
from rtmanager.adapters.redis.leases import RedisGameLeases
from rtmanager.api.auth import Authenticator, is_loopback_address, parse_auth_tokens
from rtmanager.api.health import HealthMonitor
from rtmanager.api.limits import CallLimiter
from rtmanager.api.server import SERVICE_NAMES, build_server
from rtmanager.api.servicers import Lifecycles, RuntimeAdminServicer, RuntimeServicer
from rtmanager.backoff import Backoff
from rtmanager.config import REDIS_COMMAND_TIMEOUT, Settings
from rtmanager.domain.errors import ServiceUnavailable
from rtmanager.lifecycle.cleanup import CleanupService
from rtmanager.lifecycle.common import LifecycleDeps, LifecycleSettings
from rtmanager.lifecycle.leasing import GameLock
from rtmanager.lifecycle.patch import PatchService
from rtmanager.lifecycle.queries import RuntimeExplainer, RuntimeQueries, RuntimeReads
from rtmanager.lifecycle.reconcile import Reconciler
from rtmanager.lifecycle.recorder import OperationRecorder
from rtmanager.lifecycle.restart import RecreateService, RestartService
from rtmanager.lifecycle.start import StartService
from rtmanager.lifecycle.stop import StopService
from rtmanager.lifecycle.watch import WatchService
from rtmanager.ports import BackendMismatch, EngineBackend
from rtmanager.telemetry import TelemetryExport
from rtmanager.workers.engine_events import EngineEventsListener
from rtmanager.workers.periodic import PeriodicWorker
from rtmanager.workers.stream_consumer import ConsumerNameTaken, ConsumerSettings, StreamConsumer
from rtmanager.workers.supervisor import Workers
from rtmanager.workers.ttl_cleanup import TtlCleanup

log = logging.getLogger(__name__)

_DEPENDENCY_TIMEOUT = timedelta(seconds=5)
_SCHEMA_RETRY_SECONDS = 2.0
# While waiting for PostgreSQL at start-up, each probe waits this long for a
# connection (not the full dependency timeout), so a SIGTERM meanwhile is
# acted on at once.
_SCHEMA_PROBE_SECONDS = 1.0
_FEED_STOP_SECONDS = 5.0
_SERVER_CLOSE_SECONDS = 5.0
# A shutdown waits this long at most (within its grace) for lease releases
# Redis could not take: a Redis restart is over in a second or two.
_LEASE_RELEASES_SECONDS = 5.0


class StartupError(RuntimeError):
    """The service cannot start as configured; the message says why."""


class ClosableBackend(EngineBackend, Protocol):
    """An engine backend adapter that holds connections until closed."""

    def close(self) -> None:
        """Release the adapter's connections."""
        ...


def engine_backend(settings: Settings) -> ClosableBackend:
    """The engine backend the settings ask for: the one place backends are chosen."""
    if settings.backend == "swarm":
        # Imported only for the backend that uses it.
        from rtmanager.adapters.swarm.engine import SwarmEngineAdapter

        return SwarmEngineAdapter(
            base_url=settings.docker_host,
            cluster=settings.cluster,
            constraints=settings.swarm_constraints,
            volume_driver=settings.swarm_volume_driver,
            stop_grace=settings.stop_timeout,
            start_wait=settings.start_timeout,
            timeout=settings.docker_timeout,
            probe_timeout=settings.docker_probe_timeout,
        )
    return DockerEngineAdapter(
        base_url=settings.docker_host,
        cluster=settings.cluster,
        timeout=settings.docker_timeout,
        engine_network=settings.engine_network,
        probe_timeout=settings.docker_probe_timeout,
    )


def lifecycle_settings(settings: Settings) -> LifecycleSettings:
    """The slice of the settings the lifecycle services act on."""
    return LifecycleSettings(
        cluster=settings.cluster,
        engine_network=settings.engine_network,
        engine_port=settings.engine_port,
        state_root=settings.state_root,
        engine_state_mount=settings.engine_state_mount,
        image_allowlist=tuple(settings.image_allowlist),
        image_pull_policy=settings.image_pull_policy,
        engine_memory=settings.engine_memory,
        engine_cpus=settings.engine_cpus,
        engine_pids=settings.engine_pids,
        engine_user=settings.engine_user,
        engine_log_max_size=settings.engine_log_max_size,
        engine_log_max_files=settings.engine_log_max_files,
        start_timeout=settings.start_timeout,
        stop_timeout=settings.stop_timeout,
        start_settle=settings.start_settle,
        engine_read_only=settings.engine_read_only,
        remove_state_on_cleanup=settings.remove_state_on_cleanup,
        container_labels=dict(settings.container_labels),
    )


def job_streams_config(settings: Settings) -> JobStreamsConfig:
    """The names and limits of Lobby's job streams."""
    return JobStreamsConfig(
        start_stream=settings.start_jobs_stream,
        stop_stream=settings.stop_jobs_stream,
        results_stream=settings.job_results_stream,
        dead_letter_stream=settings.dead_letter_stream,
        group=settings.stream_group,
        consumer=settings.instance_id,
        prefix=settings.redis_prefix,
        results_maxlen=settings.stream_results_maxlen,
        dead_letter_maxlen=settings.stream_dead_letter_maxlen,
        presence_ttl=settings.stream_presence_ttl,
        answered_ttl=settings.stream_answered_ttl,
    )


def consumer_settings(settings: Settings) -> ConsumerSettings:
    """How the stream consumer reads, retries and takes over."""
    return ConsumerSettings(
        consumer=settings.instance_id,
        workers=settings.stream_workers,
        batch=settings.stream_batch,
        block=settings.stream_block,
        max_buffered=settings.stream_max_buffered,
        max_deliveries=settings.stream_max_deliveries,
        claim_idle=settings.stream_claim_idle,
        retry=Backoff(settings.stream_retry_base, settings.stream_retry_max),
        retry_for=settings.stream_retry_window,
        presence_ttl=settings.stream_presence_ttl,
        consumer_expiry=settings.stream_consumer_expiry,
    )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (and mTLS when a client CA is set) credentials, or None for plaintext."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise StartupError("RTMANAGER_TLS_CLIENT_CA needs RTMANAGER_TLS_CERT and _KEY")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise StartupError("RTMANAGER_TLS_CERT and RTMANAGER_TLS_KEY must be set together")
    try:
        key = settings.tls_key.read_bytes()
        cert = settings.tls_cert.read_bytes()
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as error:
        raise StartupError(f"cannot read TLS files: {error}") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def check_exposure(
    address: str, *, has_tokens: bool, tls: bool, allow_cleartext_tokens: bool
) -> None:
    """Refuse to listen where callers or their tokens would be exposed.

    On a loopback address anything goes. Elsewhere tokens are required
    (without them every caller is admin), and they must travel over TLS
    unless `RTMANAGER_ALLOW_CLEARTEXT_TOKENS` says the network is trusted
    (TLS ends at a proxy or a service mesh sidecar in front of the server).
    Raises `StartupError` saying what to change.
    """
    if is_loopback_address(address):
        return
    if not has_tokens:
        raise StartupError(
            f"refusing to listen on {address} without authentication: "
            "set RTMANAGER_AUTH_TOKENS or bind to a loopback address"
        )
    if not tls and not allow_cleartext_tokens:
        raise StartupError(
            f"refusing to accept bearer tokens in cleartext on {address}: set "
            "RTMANAGER_TLS_CERT and RTMANAGER_TLS_KEY, bind to a loopback address, or set "
            "RTMANAGER_ALLOW_CLEARTEXT_TOKENS=true if the network to this server is trusted"
        )


class Application:
    """The whole service of one process, built from settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        tokens = parse_auth_tokens(settings.auth_tokens)
        credentials = server_credentials(settings)
        check_exposure(
            settings.grpc_addr,
            has_tokens=bool(tokens),
            tls=credentials is not None,
            allow_cleartext_tokens=settings.allow_cleartext_tokens,
        )
        self.export = TelemetryExport(
            metrics_addr=settings.metrics_addr,
            otlp_endpoint=settings.otlp_endpoint,
            service_name="rtmanager",
        )
        telemetry = self.export.telemetry
        self.pool = create_pool(
            settings.postgres_dsn,
            settings.postgres_schema,
            max_size=settings.postgres_pool_size,
            timeout=_DEPENDENCY_TIMEOUT,
        )
        self.units_of_work = PostgresUnitOfWorkFactory(self.pool)
        # Awaited on the server's loop; opened and closed there by the server.
        self.record_reader = PostgresRecordReader(
            settings.postgres_dsn,
            settings.postgres_schema,
            max_size=settings.postgres_read_pool_size,
            timeout=_DEPENDENCY_TIMEOUT,
        )
        self.feed = PostgresRuntimeFeed(
            dsn=settings.postgres_dsn,
            schema=settings.postgres_schema,
            pool=self.pool,
            max_subscribers=settings.watch_max_subscribers,
            queue_capacity=settings.watch_queue_size,
            retention=settings.watch_retention,
            telemetry=telemetry,
        )
        self.redis = create_redis(settings.redis_url, timeout=REDIS_COMMAND_TIMEOUT)
        self.leases = RedisGameLeases(
            self.redis, prefix=settings.redis_prefix, instance_id=settings.instance_id
        )
        self._backend = engine_backend(settings)
        self.engine = InstrumentedBackend(self._backend, telemetry)
        self.lock = GameLock(
            self.leases, settings.game_lease_ttl, on_acquire_latency=telemetry.lease_acquired
        )
        self.recorder = OperationRecorder(
            self.units_of_work, telemetry, lease_check=self.lock.check
        )
        lifecycle = lifecycle_settings(settings)
        deps = LifecycleDeps(
            recorder=self.recorder, lock=self.lock, engine=self.engine, settings=lifecycle
        )
        start = StartService(deps)
        stop = StopService(deps)
        recreate = RecreateService(deps, stop=stop, start=start)
        cleanup = CleanupService(deps, stop=stop)
        self.reconciler = Reconciler(deps, telemetry=telemetry)
        job_streams = RedisJobStreams(self.redis, job_streams_config(settings))
        self.lifecycles = Lifecycles(
            queries=RuntimeQueries(self.units_of_work),
            reads=RuntimeReads(self.record_reader),
            start=start,
            stop=stop,
            restart=RestartService(recreate),
            patch=PatchService(recreate),
            cleanup=cleanup,
            reconciler=self.reconciler,
            watch=WatchService(self.feed, heartbeat=settings.watch_heartbeat),
            explainer=RuntimeExplainer(self.units_of_work, self.engine, self.leases, job_streams),
        )
        self.stream_consumer = StreamConsumer(
            job_streams,
            start,
            stop,
            consumer_settings(settings),
            telemetry,
        )
        ttl_cleanup = TtlCleanup(self.units_of_work, cleanup, ttl=settings.container_ttl)
        self.workers = Workers(
            reconciler=self.reconciler,
            events=EngineEventsListener(self.engine, self.reconciler),
            periodic=[
                PeriodicWorker("reconciler", self.reconciler.run_pass, settings.reconcile_interval),
                PeriodicWorker("ttl-cleanup", ttl_cleanup.run_once, settings.cleanup_interval),
            ],
            stream_consumer=self.stream_consumer,
        )
        self.health = HealthMonitor(
            {
                "postgres": self._check_postgres,
                "redis": self._check_redis,
                "docker": self.engine.ping,
            },
            services=SERVICE_NAMES,
        )
        auth = Authenticator(tokens)
        self.calls = CallLimiter(settings.max_concurrent_rpcs)
        self.server = build_server(
            address=settings.grpc_addr,
            runtime=RuntimeServicer(self.lifecycles, auth, self.calls),
            admin=RuntimeAdminServicer(self.lifecycles, auth, self.calls),
            health_servicer=self.health.servicer,
            max_workers=settings.grpc_max_workers,
            max_message_bytes=settings.grpc_max_message_bytes,
            reflection_enabled=settings.reflection,
            interceptors=self.export.server_interceptors(),
            credentials=credentials,
            resources=[self.record_reader],
        )
        self.port = self.server.port
        if tokens and credentials is None and not is_loopback_address(settings.grpc_addr):
            log.warning(
                "bearer tokens accepted in cleartext (RTMANAGER_ALLOW_CLEARTEXT_TOKENS=true): "
                "the network to this server must be trusted",
                extra={"address": settings.grpc_addr},
            )
        if not tokens:
            log.warning(
                "no RTMANAGER_AUTH_TOKENS: every caller is trusted as admin; "
                "listening on loopback only",
                extra={"address": settings.grpc_addr},
            )
        self._lock = threading.Lock()
        self._draining = threading.Event()
        self._startup: threading.Thread | None = None
        self._drained: bool | None = None
        self.startup_failed = threading.Event()
        """Set when start-up ended with `startup_error` (the process should exit)."""
        self.startup_error: Exception | None = None

    def _check_postgres(self, timeout: float = _DEPENDENCY_TIMEOUT.total_seconds()) -> None:
        with self.pool.connection(timeout=timeout) as conn:
            check_schema_version(conn, self.settings.postgres_schema, self.settings.migrations_dir)
            check_schema_owner(conn, self.settings.postgres_schema, self.settings.cluster)

    def _check_redis(self) -> None:
        self.redis.ping()

    def begin_start_up(self) -> None:
        """Start serving on a thread of its own; returns at once.

        That thread waits for PostgreSQL and the schema, starts the event
        feed, the server and the health checks, runs the start-up reconcile
        and starts the workers; health reports SERVING only after that.
        Every step gives way to `shutdown()`. A schema of another version
        (or a bug) ends start-up with `startup_error` and `startup_failed`
        set. Start-up runs off the main thread so that the main thread is
        always free to act on signals.
        """
        self._startup = threading.Thread(target=self._start_up, name="startup", daemon=True)
        self._startup.start()

    def _start_up(self) -> None:
        try:
            if not self._check_backend():
                return
            if not self._wait_for_schema():
                return
            self.stream_consumer.register(self._draining)
            with self._lock:
                if self._draining.is_set():
                    return
                self.feed.start()
                self.server.start()
                self.health.start()
            if not self.workers.start(on_ready=self.health.set_ready):
                return
            log.info(
                "rtmanager serving",
                extra={
                    "address": self.settings.grpc_addr,
                    "port": self.port,
                    "cluster": self.settings.cluster,
                    "instance_id": self.settings.instance_id,
                },
            )
        except (SchemaVersionError, ConsumerNameTaken) as error:
            self.startup_error = error
            self.startup_failed.set()
        except Exception as error:
            log.exception("start-up failed")
            self.startup_error = error
            self.startup_failed.set()

    def _check_backend(self) -> bool:
        """Refuse to start on an engine endpoint the backend cannot use; False then.

        E.g. `RTMANAGER_BACKEND=swarm` with an engine that is no swarm
        manager. An endpoint that does not answer yet is not refused: health
        reports it until it does.
        """
        try:
            self.engine.ping()
        except BackendMismatch as error:
            self.startup_error = StartupError(error.message)
            self.startup_failed.set()
            return False
        except ServiceUnavailable as error:
            log.warning("engine backend not reachable yet", extra={"problem": error.message})
        return True

    def _wait_for_schema(self) -> bool:
        """Wait until the database answers with the schema this build knows.

        An unreachable database is waited for (dependencies may start in any
        order); a schema of another version raises `SchemaVersionError`.
        Returns False when shutdown began first. Each probe is short, so a
        shutdown never waits long for it.
        """
        while not self._draining.is_set():
            try:
                self._check_postgres(timeout=_SCHEMA_PROBE_SECONDS)
                return True
            except SchemaVersionError:
                raise
            except Exception as error:
                log.warning("waiting for PostgreSQL", extra={"problem": str(error)})
                self._draining.wait(_SCHEMA_RETRY_SECONDS)
        return False

    def shutdown(self, grace: timedelta | None = None) -> bool:
        """Drain in the order of SPEC §5 under one deadline; True when everything ended in time.

        NOT_SERVING; the workers take no new work; the server stops
        accepting; watches end (clients resume elsewhere with their cursor);
        in-flight calls, jobs, periodic runs and the start-up work finish
        within `grace` (default RTMANAGER_SHUTDOWN_GRACE), all of them
        within the same deadline. Each operation releases its own lease as it
        ends; a release Redis could not take is given a few more seconds
        (`_LEASE_RELEASES_SECONDS`) to land. The pools are closed last, and
        only when nothing that may use them still runs: when the grace ran
        out first, they are left for the process exit to drop, and the
        leases of the operations still running expire on their own (Docker
        may still complete a call they sent, so releasing them early could
        let another replica act on the game at the same time). A second call
        returns at once: True only when the first one has finished cleanly.
        """
        with self._lock:
            if self._draining.is_set():
                return bool(self._drained)
            self._draining.set()
        grace = self.settings.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + grace.total_seconds()
        log.info("draining", extra={"grace_seconds": grace.total_seconds()})
        self.health.drain()
        self.workers.begin_drain()
        # Stop accepting; grpc cancels what still runs at the deadline. Then
        # end the watches (UNAVAILABLE with their cursor).
        server_stopped = self.server.stop(_left(deadline))
        self.feed.stop(min(_FEED_STOP_SECONDS, _left(deadline)))
        # In this order, each within what is left of the one deadline.
        waits: dict[str, Callable[[], bool]] = {
            "calls": lambda: self.calls.wait_idle(_left(deadline)),
            "start-up": lambda: self._join_startup(_left(deadline)),
            "workers": lambda: self.workers.stop(_left(deadline)),
            "server": lambda: server_stopped.wait(_left(deadline)),
            "health checks": lambda: self.health.stop(_left(deadline)),
        }
        unfinished = [name for name, wait in waits.items() if not wait()]
        self._finish_lease_releases(deadline)
        held = self.lock.held_games
        if held:
            unfinished.append("operations")
        if unfinished:
            log.error(
                "work still running when the shutdown grace ended; pools left open",
                extra={"unfinished": unfinished, "games": held},
            )
            self.export.shutdown()
            self._drained = False
            return False
        self.close()
        log.info("stopped")
        self._drained = True
        return True

    def _finish_lease_releases(self, deadline: float) -> None:
        """Give the releases Redis could not take (see `GameLock`) a few more
        seconds to land, so that other replicas need not wait out their TTL."""
        pending = self.lock.finish_releases(min(_left(deadline), _LEASE_RELEASES_SECONDS))
        if pending:
            log.warning(
                "game leases left to expire: Redis did not take their release before the exit",
                extra={"games": pending},
            )

    def _join_startup(self, timeout: float) -> bool:
        if self._startup is None:
            return True
        self._startup.join(timeout)
        return not self._startup.is_alive()

    def close(self) -> None:
        """Release every connection the application holds (nothing may still use them)."""
        self.feed.stop(_FEED_STOP_SECONDS)
        self.server.close(_SERVER_CLOSE_SECONDS)
        self.pool.close()
        self.redis.close()
        self._backend.close()
        self.export.shutdown()


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)
