"""The gRPC server: servicers, health, reflection, limits, one listening address,
served by `grpc.aio` on an event loop of its own."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.api.health import LoopHealthServicer
from rtmanager.api.servicers import RuntimeAdminServicer, RuntimeServicer

RUNTIME_SERVICE = pb.DESCRIPTOR.services_by_name["RuntimeService"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["RuntimeAdminService"].full_name
SERVICE_NAMES = (RUNTIME_SERVICE, ADMIN_SERVICE)

T = TypeVar("T")
log = logging.getLogger(__name__)


class LoopResource(Protocol):
    """Something the handlers on the server's loop use, bound to that loop
    (such as an asyncio connection pool): opened before the server serves,
    closed once it has stopped and its calls have ended."""

    async def open(self) -> None:
        """Open on the running loop."""
        ...

    async def close(self) -> None:
        """Close on the running loop."""
        ...


class BindError(RuntimeError):
    """The server could not listen on the configured address."""


class _Handlers:
    """Takes the handlers a generated `add_…_to_server` function registers."""

    def __init__(self) -> None:
        self.by_method: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers come again through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.by_method = dict(handlers)


def _already_serialized(wire: bytes) -> bytes:
    return wire


def add_runtime_service(runtime: RuntimeServicer, server: grpc.aio.Server) -> None:
    """Register `RuntimeService` as the generated code does, except that the
    reads send the bytes their servicer methods return as they are:
    `GetRuntime` and `ListRuntimes` assemble replies from memoised record
    bytes, `WatchRuntimes` serializes each change once for all its watchers
    (see `RuntimeServicer`) on the server's event loop. Clients are
    unaffected: the bytes are the methods' response messages."""
    taken = _Handlers()
    pb_grpc.add_RuntimeServiceServicer_to_server(runtime, taken)  # type: ignore[arg-type]
    handlers = taken.by_method
    handlers["GetRuntime"] = grpc.unary_unary_rpc_method_handler(
        runtime.GetRuntime,
        request_deserializer=pb.GetRuntimeRequest.FromString,
        response_serializer=_already_serialized,
    )
    handlers["ListRuntimes"] = grpc.unary_unary_rpc_method_handler(
        runtime.ListRuntimes,
        request_deserializer=pb.ListRuntimesRequest.FromString,
        response_serializer=_already_serialized,
    )
    handlers["WatchRuntimes"] = grpc.unary_stream_rpc_method_handler(
        runtime.WatchRuntimes,
        request_deserializer=pb.WatchRuntimesRequest.FromString,
        response_serializer=_already_serialized,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(RUNTIME_SERVICE, handlers),)
    )
    # Not in the typing stubs yet; the generated code calls it too.
    server.add_registered_method_handlers(RUNTIME_SERVICE, handlers)  # type: ignore[attr-defined]


class GrpcServer:
    """The gRPC server: `grpc.aio` on an event loop in a thread of its own.

    Coroutine handlers run on the loop, one task per call and no thread:
    `WatchRuntimes` (each change is handed to the loop once and written to
    every watcher's stream there), and `GetRuntime` and `ListRuntimes`,
    which await PostgreSQL through a pool of the loop's own (one of the
    `resources`). Every other handler (the lifecycle RPCs, the admin RPCs,
    health checks) is synchronous and runs in the server's thread pool of
    `max_workers` threads (grpc's migration thread pool). Reflection is
    grpc's asyncio servicer.

    Built and bound by the constructor (raising `BindError`); `start` opens
    the `resources` on the loop, then serves; `stop(grace)` stops accepting
    calls at once, ends what still runs at the end of `grace`, then closes
    the `resources`; `close` ends the loop and the thread pool once the
    server has stopped.
    """

    def __init__(
        self,
        *,
        address: str,
        register: Callable[[grpc.aio.Server], None],
        max_workers: int,
        max_message_bytes: int,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        credentials: grpc.ServerCredentials | None = None,
        resources: Sequence[LoopResource] = (),
    ) -> None:
        self._resources = tuple(resources)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="grpc-loop", daemon=True)
        self._thread.start()
        self._stopped = threading.Event()
        self._stopping = False
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Never share a port with another process silently.
            ("grpc.so_reuseport", 0),
        ]
        try:
            self._server, self.port = self._run(
                self._build(address, register, options, list(interceptors), credentials)
            )
        except BaseException:
            self.close(5.0)
            raise

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    async def _build(
        self,
        address: str,
        register: Callable[[grpc.aio.Server], None],
        options: list[tuple[str, Any]],
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]],
        credentials: grpc.ServerCredentials | None,
    ) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            migration_thread_pool=self._executor, interceptors=interceptors, options=options
        )
        register(server)
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise BindError(f"cannot listen on {address}: {error}") from error
        if port == 0:
            raise BindError(f"cannot listen on {address}")
        return server, port

    def start(self) -> None:
        """Open the resources, then start serving."""
        self._run(self._start())

    async def _start(self) -> None:
        for resource in self._resources:
            await resource.open()
        await self._server.start()

    def stop(self, grace: float) -> threading.Event:
        """Stop accepting calls now; cancel those still running after `grace` seconds.

        Returns an event set once every call has ended and the resources
        are closed. A second call returns the same event.
        """
        if not self._stopping:
            self._stopping = True
            done = asyncio.run_coroutine_threadsafe(self._stop(grace), self.loop)
            done.add_done_callback(lambda _: self._stopped.set())
        return self._stopped

    async def _stop(self, grace: float) -> None:
        try:
            await self._server.stop(grace)
        finally:
            for resource in self._resources:
                try:
                    await resource.close()
                except Exception:
                    log.exception("closing a resource of the server's loop failed")

    def close(self, timeout: float) -> None:
        """End the event loop and the thread pool (after `stop` has finished)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
        self._executor.shutdown(wait=False)


def build_server(
    *,
    address: str,
    runtime: RuntimeServicer,
    admin: RuntimeAdminServicer,
    health_servicer: health.HealthServicer,
    max_workers: int,
    max_message_bytes: int,
    reflection_enabled: bool,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    credentials: grpc.ServerCredentials | None = None,
    resources: Sequence[LoopResource] = (),
) -> GrpcServer:
    """Build (not start) the server with every service and bind it; `resources`
    are opened on its loop when it starts and closed when it stops."""

    def register(server: grpc.aio.Server) -> None:
        add_runtime_service(runtime, server)
        pb_grpc.add_RuntimeAdminServiceServicer_to_server(admin, server)
        health_pb2_grpc.add_HealthServicer_to_server(LoopHealthServicer(health_servicer), server)
        if reflection_enabled:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )

    return GrpcServer(
        address=address,
        register=register,
        max_workers=max_workers,
        max_message_bytes=max_message_bytes,
        interceptors=interceptors,
        credentials=credentials,
        resources=resources,
    )
