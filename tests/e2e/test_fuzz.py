"""Hypothesis-generated requests for every RPC against a live server.

No request, however malformed, may produce INTERNAL or UNKNOWN, crash the
server, or leave a row behind that breaks a domain rule.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from rtmanager.adapters.postgres.pool import create_pool
from rtmanager.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from rtmanager.api.errors import error_info_of
from rtmanager.domain.ids import GAME_ID_PATTERN
from rtmanager.ports import OperationFilter
from tests.conftest import POSTGRES_DSN
from tests.e2e.conftest import ServerProcess

pytestmark = pytest.mark.e2e

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
STABLE_REASONS = {
    "invalid_request",
    "not_found",
    "conflict",
    "semver_patch_only",
    "image_not_allowed",
    "image_pull_failed",
    "container_start_failed",
    "service_unavailable",
    "unimplemented",
}

game_ids = st.one_of(
    st.from_regex(GAME_ID_PATTERN, fullmatch=True),
    st.sampled_from(["fuzz-a", "fuzz-b", "../etc", "", "A", "-x", "x" * 52]),
    st.text(max_size=80),
)
# Allowed-but-absent images fail fast with image_pull_failed (pull policy
# never); no request here starts a real engine.
image_refs = st.one_of(
    st.sampled_from(
        ["galaxy/fuzz-absent:1.0.0", "galaxy/fuzz-absent:1.0.1", "evil/engine:1.0.0", "", ":"]
    ),
    st.from_regex(r"[a-z0-9./:@_-]{0,40}", fullmatch=True),
    st.text(max_size=60),
)
source_refs = st.one_of(st.just(""), st.text(max_size=40), st.text(min_size=250, max_size=300))
enums = st.integers(min_value=-3, max_value=12)
page_sizes = st.integers(min_value=-5, max_value=5000)
page_tokens = st.one_of(st.just(""), st.text(max_size=60), st.binary(max_size=40).map(bytes.hex))
timestamps = st.one_of(
    st.none(),
    st.builds(
        lambda s, n: Timestamp(seconds=s, nanos=n),
        st.integers(min_value=-(2**40), max_value=2**40),
        st.integers(min_value=0, max_value=999_999_999),
    ),
)

REQUESTS: dict[str, tuple[str, st.SearchStrategy[Any]]] = {
    "StartRuntime": (
        "runtime",
        st.builds(
            pb.StartRuntimeRequest, game_id=game_ids, image_ref=image_refs, source_ref=source_refs
        ),
    ),
    "StopRuntime": (
        "runtime",
        st.builds(pb.StopRuntimeRequest, game_id=game_ids, reason=enums, source_ref=source_refs),
    ),
    "RestartRuntime": (
        "runtime",
        st.builds(pb.RestartRuntimeRequest, game_id=game_ids, source_ref=source_refs),
    ),
    "PatchRuntime": (
        "runtime",
        st.builds(
            pb.PatchRuntimeRequest, game_id=game_ids, image_ref=image_refs, source_ref=source_refs
        ),
    ),
    "GetRuntime": ("runtime", st.builds(pb.GetRuntimeRequest, game_id=game_ids)),
    "ListRuntimes": (
        "runtime",
        st.builds(
            pb.ListRuntimesRequest, status=enums, page_size=page_sizes, page_token=page_tokens
        ),
    ),
    "CleanupRuntime": (
        "admin",
        st.builds(
            pb.CleanupRuntimeRequest, game_id=game_ids, force=st.booleans(), source_ref=source_refs
        ),
    ),
    "ListOperations": (
        "admin",
        st.builds(
            lambda game_id, kind, source, outcome, since, until, size, token: (
                pb.ListOperationsRequest(
                    game_id=game_id,
                    op_kind=kind,
                    op_source=source,
                    outcome=outcome,
                    since=since,
                    until=until,
                    page_size=size,
                    page_token=token,
                )
            ),
            game_ids,
            enums,
            enums,
            enums,
            timestamps,
            timestamps,
            page_sizes,
            page_tokens,
        ),
    ),
    "Reconcile": ("admin", st.builds(pb.ReconcileRequest, dry_run=st.booleans())),
    "ExplainRuntime": (
        "admin",
        st.builds(
            pb.ExplainRuntimeRequest,
            game_id=game_ids,
            operations_limit=st.integers(min_value=-(2**31), max_value=2**31 - 1),
        ),
    ),
    "WatchRuntimes": (
        "runtime",
        st.builds(
            pb.WatchRuntimesRequest,
            game_ids=st.lists(game_ids, max_size=3),
            statuses=st.lists(enums, max_size=3),
            since=page_tokens,
            initial_snapshot=st.booleans(),
        ),
    ),
}


def check_reply(call: Callable[[], Any]) -> None:
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() not in FORBIDDEN, error.details()
        info = error_info_of(error)
        assert info is not None, f"{error.code()} without ErrorInfo: {error.details()}"
        assert info.domain == "rtmanager.galaxy"
        assert info.reason in STABLE_REASONS


@pytest.mark.parametrize("method", sorted(REQUESTS))
def test_generated_requests_get_stable_errors_and_write_only_valid_rows(
    server: ServerProcess, server_environment: dict[str, str], method: str
) -> None:
    service, strategy = REQUESTS[method]
    with server.channel() as channel:
        stub: Any = (
            pb_grpc.RuntimeServiceStub(channel)
            if service == "runtime"
            else pb_grpc.RuntimeAdminServiceStub(channel)
        )
        rpc = getattr(stub, method)
        if method == "WatchRuntimes":
            watch = rpc

            def rpc(request: Any, timeout: float) -> Any:
                # A valid watch waits for changes; its first message (or its
                # error) is what counts. A quiet stream ends at the deadline.
                try:
                    return list(watch(request, timeout=0.3))
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        return None
                    raise

        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(request=strategy)
        def fuzz(request: Any) -> None:
            check_reply(lambda: rpc(request, timeout=30))

        fuzz()

    assert server.process.poll() is None, "the server died"
    assert "Traceback" not in server.log()
    # Every stored row still satisfies the domain's rules (the adapters
    # validate on the way out and would raise otherwise).
    pool = create_pool(
        POSTGRES_DSN,
        server_environment["RTMANAGER_POSTGRES_SCHEMA"],
        max_size=1,
        timeout=timedelta(seconds=5),
    )
    try:
        with PostgresUnitOfWorkFactory(pool)() as uow:
            for record in uow.records.list(page_size=1000).items:
                record.validate()
            for entry in uow.operations.list(OperationFilter(), page_size=1000).items:
                entry.validate()
    finally:
        pool.close()
