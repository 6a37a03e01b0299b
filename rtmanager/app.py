"""The composition root: builds adapters, use cases, servicers and the server.

Nothing else in the project constructs adapters; everything receives its
collaborators from here.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import grpc
from opentelemetry.instrumentation.grpc import server_interceptor

from rtmanager.adapters.docker.engine import DockerEngineAdapter
from rtmanager.adapters.docker.instrumented import InstrumentedDocker
from rtmanager.adapters.postgres.event_feed import PostgresRuntimeFeed
from rtmanager.adapters.postgres.migrations import (
    SchemaVersionError,
    check_schema_owner,
    check_schema_version,
)
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.adapters.redis.client import create_redis
from rtmanager.adapters.redis.leases import RedisGameLeases
from rtmanager.api.auth import Authenticator, is_loopback_address, parse_auth_tokens
from rtmanager.api.health import HealthMonitor
from rtmanager.api.server import SERVICE_NAMES, build_server
from rtmanager.api.servicers import Lifecycles, RuntimeAdminServicer, RuntimeServicer
from rtmanager.config import Settings
from rtmanager.lifecycle.cleanup import CleanupService
from rtmanager.lifecycle.common import LifecycleDeps, LifecycleSettings
from rtmanager.lifecycle.leasing import GameLock
from rtmanager.lifecycle.patch import PatchService
from rtmanager.lifecycle.queries import RuntimeQueries
from rtmanager.lifecycle.reconcile import Reconciler
from rtmanager.lifecycle.recorder import OperationRecorder
from rtmanager.lifecycle.restart import RecreateService, RestartService
from rtmanager.lifecycle.start import StartService
from rtmanager.lifecycle.stop import StopService
from rtmanager.lifecycle.watch import WatchService
from rtmanager.telemetry import TelemetryExport
from rtmanager.workers.docker_events import DockerEventsListener
from rtmanager.workers.periodic import PeriodicWorker
from rtmanager.workers.stream_consumer import StreamConsumer, StreamSettings
from rtmanager.workers.supervisor import Workers
from rtmanager.workers.ttl_cleanup import TtlCleanup

log = logging.getLogger(__name__)

_DEPENDENCY_TIMEOUT = timedelta(seconds=5)
_SCHEMA_RETRY_SECONDS = 2.0


class StartupError(RuntimeError):
    """The service cannot start as configured; the message says why."""


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
        start_timeout=settings.start_timeout,
        stop_timeout=settings.stop_timeout,
        start_settle=settings.start_settle,
        engine_read_only=settings.engine_read_only,
        remove_state_on_cleanup=settings.remove_state_on_cleanup,
        container_labels=dict(settings.container_labels),
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


class Application:
    """The whole service of one process, built from settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        tokens = parse_auth_tokens(settings.auth_tokens)
        if not tokens and not is_loopback_address(settings.grpc_addr):
            raise StartupError(
                f"refusing to listen on {settings.grpc_addr} without authentication: "
                "set RTMANAGER_AUTH_TOKENS or bind to a loopback address"
            )
        credentials = server_credentials(settings)
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
        self.feed = PostgresRuntimeFeed(
            dsn=settings.postgres_dsn,
            schema=settings.postgres_schema,
            pool=self.pool,
            max_subscribers=settings.watch_max_subscribers,
            queue_capacity=settings.watch_queue_size,
            retention=settings.watch_retention,
            telemetry=telemetry,
        )
        self.redis = create_redis(settings.redis_url, timeout=_DEPENDENCY_TIMEOUT)
        self.leases = RedisGameLeases(self.redis, prefix=settings.redis_prefix)
        self._docker_adapter = DockerEngineAdapter(
            base_url=settings.docker_host,
            cluster=settings.cluster,
            timeout=settings.docker_timeout,
        )
        self.docker = InstrumentedDocker(self._docker_adapter, telemetry)
        self.lock = GameLock(
            self.leases, settings.game_lease_ttl, on_acquire_latency=telemetry.lease_acquired
        )
        self.recorder = OperationRecorder(self.units_of_work, telemetry)
        lifecycle = lifecycle_settings(settings)
        deps = LifecycleDeps(
            recorder=self.recorder, lock=self.lock, docker=self.docker, settings=lifecycle
        )
        start = StartService(deps)
        stop = StopService(deps)
        recreate = RecreateService(deps, stop=stop, start=start)
        cleanup = CleanupService(deps, stop=stop)
        self.reconciler = Reconciler(deps, telemetry=telemetry)
        self.lifecycles = Lifecycles(
            queries=RuntimeQueries(self.units_of_work),
            start=start,
            stop=stop,
            restart=RestartService(recreate),
            patch=PatchService(recreate),
            cleanup=cleanup,
            reconciler=self.reconciler,
            watch=WatchService(self.feed, heartbeat=settings.watch_heartbeat),
        )
        ttl_cleanup = TtlCleanup(self.units_of_work, cleanup, ttl=settings.container_ttl)
        self.workers = Workers(
            reconciler=self.reconciler,
            events=DockerEventsListener(self.docker, self.reconciler),
            periodic=[
                PeriodicWorker("reconciler", self.reconciler.run_pass, settings.reconcile_interval),
                PeriodicWorker("ttl-cleanup", ttl_cleanup.run_once, settings.cleanup_interval),
            ],
            stream_consumer=StreamConsumer(
                self.redis, start, stop, StreamSettings.from_settings(settings), telemetry
            ),
        )
        self.health = HealthMonitor(
            {
                "postgres": self._check_postgres,
                "redis": self._check_redis,
                "docker": self.docker.ping,
            },
            services=SERVICE_NAMES,
        )
        auth = Authenticator(tokens)
        self.server, self.port = build_server(
            address=settings.grpc_addr,
            runtime=RuntimeServicer(self.lifecycles, auth),
            admin=RuntimeAdminServicer(self.lifecycles, auth),
            health_servicer=self.health.servicer,
            max_workers=settings.grpc_max_workers,
            max_message_bytes=settings.grpc_max_message_bytes,
            reflection_enabled=settings.reflection,
            interceptors=[
                server_interceptor(  # type: ignore[no-untyped-call]
                    tracer_provider=self.export.tracer_provider
                )
            ],
            credentials=credentials,
        )
        if not tokens:
            log.warning(
                "no RTMANAGER_AUTH_TOKENS: every caller is trusted as admin; "
                "listening on loopback only",
                extra={"address": settings.grpc_addr},
            )
        self._stopped = threading.Event()

    def _check_postgres(self) -> None:
        with self.pool.connection(timeout=_DEPENDENCY_TIMEOUT.total_seconds()) as conn:
            check_schema_version(conn, self.settings.postgres_schema, self.settings.migrations_dir)
            check_schema_owner(conn, self.settings.postgres_schema, self.settings.cluster)

    def _check_redis(self) -> None:
        self.redis.ping()

    def wait_for_schema(self, stop: threading.Event) -> None:
        """Block until the database answers with the schema this build knows.

        An unreachable database is waited for (dependencies may start in any
        order); a schema of another version raises `SchemaVersionError`.
        """
        while not stop.is_set():
            try:
                self._check_postgres()
                return
            except SchemaVersionError:
                raise
            except Exception as error:
                log.warning("waiting for PostgreSQL", extra={"problem": str(error)})
                stop.wait(_SCHEMA_RETRY_SECONDS)

    def start(self, stop: threading.Event) -> bool:
        """Start serving and every worker; False when `stop` came first.

        The server listens at once but health reports SERVING only after the
        start-up reconcile pass and while the dependency checks pass.
        """
        self.feed.start()
        self.server.start()
        self.health.start()
        if not self.workers.start(stop, on_ready=self.health.set_ready):
            return False
        log.info(
            "rtmanager serving",
            extra={
                "address": self.settings.grpc_addr,
                "port": self.port,
                "cluster": self.settings.cluster,
                "instance_id": self.settings.instance_id,
            },
        )
        return True

    def shutdown(self, grace: timedelta | None = None) -> None:
        """Drain and stop: NOT_SERVING, finish in-flight RPCs within the grace, close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.shutdown_grace if grace is None else grace
        log.info("draining", extra={"grace_seconds": grace.total_seconds()})
        self.health.drain()
        deadline = time.monotonic() + grace.total_seconds()
        # Watches end at once (clients resume elsewhere with their cursor);
        # they must not hold the server through the whole grace period.
        self.feed.stop(5.0)
        self.server.stop(grace.total_seconds()).wait()
        self.workers.stop(max(deadline - time.monotonic(), 1.0))
        held = self.lock.held_games
        if held:
            log.warning("operations still running after the grace period", extra={"games": held})
        self.health.stop()
        self.close()
        log.info("stopped")

    def close(self) -> None:
        """Release every connection the application holds."""
        self.feed.stop(5.0)
        self.pool.close()
        self.redis.close()
        self._docker_adapter.close()
        self.export.shutdown()
