"""The gRPC server: servicers, health, reflection, limits, one listening address."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.api.servicers import RuntimeAdminServicer, RuntimeServicer

RUNTIME_SERVICE = pb.DESCRIPTOR.services_by_name["RuntimeService"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["RuntimeAdminService"].full_name
SERVICE_NAMES = (RUNTIME_SERVICE, ADMIN_SERVICE)


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


def add_runtime_service(runtime: RuntimeServicer, server: grpc.Server) -> None:
    """Register `RuntimeService` as the generated code does, except that the
    reads send the bytes their servicer methods return as they are:
    `GetRuntime` and `ListRuntimes` assemble replies from memoised record
    bytes, `WatchRuntimes` serializes each change once for all its watchers
    (see `RuntimeServicer`). Clients are unaffected: the bytes are the
    methods' response messages."""
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


def build_server(
    *,
    address: str,
    runtime: RuntimeServicer,
    admin: RuntimeAdminServicer,
    health_servicer: health.HealthServicer,
    max_workers: int,
    max_message_bytes: int,
    reflection_enabled: bool,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int]:
    """Build (not start) the server and bind it; return it with the bound port."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Never share a port with another process silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    add_runtime_service(runtime, server)
    pb_grpc.add_RuntimeAdminServiceServicer_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
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
