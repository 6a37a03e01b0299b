"""Memory: resident set size of the rtmanager server process against the bare server.

Both processes are started as for `bench.grpc_read` (rtmanager seeded with
100 records, auth and metrics off; the bare server answering the same bytes).
Read from /proc/<pid>/status:

- idle: VmRSS after both report ready and have sat idle for a moment
  (rtmanager's start-up reconcile pass and first health checks done);
- after load: VmRSS after a read load — GetRuntime then
  ListRuntimes(page_size=100), 8 client threads each, alternating targets —
  and a short pause;
- peak: VmHWM, the high-water mark of the whole run.

ratio = rtmanager / bare. The bare server loads grpc and the generated
protobuf code only, so the ratio shows what the service itself adds:
PostgreSQL/Redis/Docker clients, OpenTelemetry, pools and worker threads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import Row, isolation, log, proc_status
from bench.grpc_read import ReadClient, read_servers, run_load, seeded_game_ids

NAME = "memory"
LOAD_CASES: tuple[tuple[str, int], ...] = (("GetRuntime", 8), ("ListRuntimes", 8))


@dataclass(frozen=True)
class MemoryParams:
    """Idle wait and load length."""

    idle_seconds: float
    load_seconds: float
    """Per case and target."""
    settle_seconds: float
    max_calls: int


DEFAULT = MemoryParams(idle_seconds=3.0, load_seconds=4.0, settle_seconds=1.0, max_calls=100_000)
QUICK = MemoryParams(idle_seconds=1.0, load_seconds=1.0, settle_seconds=0.5, max_calls=20_000)


def run(*, quick: bool = False) -> dict[str, Any]:
    """Sample both servers idle, load them, sample again; return rows and raw numbers."""
    params = QUICK if quick else DEFAULT
    raw: dict[str, dict[str, dict[str, int]]] = {}
    load: dict[str, dict[str, int]] = {}
    with isolation(NAME) as iso, read_servers(iso) as (server, bare):
        pids = {"rtmanager": server.process.pid, "bare": bare.process.pid}
        time.sleep(params.idle_seconds)
        raw["idle"] = {name: proc_status(pid) for name, pid in pids.items()}
        log(f"{NAME}: idle sampled; loading")
        clients = {
            "rtmanager": ReadClient(server.address, seeded_game_ids()),
            "bare": ReadClient(bare.address, seeded_game_ids()),
        }
        try:
            for rpc, concurrency in LOAD_CASES:
                for name, client in clients.items():
                    result = run_load(
                        client.call(rpc),
                        concurrency=concurrency,
                        seconds=params.load_seconds,
                        max_calls=params.max_calls,
                    )
                    load.setdefault(name, {})[f"{rpc} x{concurrency} calls"] = result.calls
        finally:
            for client in clients.values():
                client.close()
        time.sleep(params.settle_seconds)
        raw["after_load"] = {name: proc_status(pid) for name, pid in pids.items()}

    def mib(kb: int) -> float:
        return kb / 1024

    rows = [
        Row(
            NAME,
            "idle",
            "VmRSS",
            "MiB",
            mib(raw["idle"]["rtmanager"]["rss_kb"]),
            mib(raw["idle"]["bare"]["rss_kb"]),
            notes={
                "threads": [raw["idle"]["rtmanager"]["threads"], raw["idle"]["bare"]["threads"]]
            },
        ),
        Row(
            NAME,
            "after read load",
            "VmRSS",
            "MiB",
            mib(raw["after_load"]["rtmanager"]["rss_kb"]),
            mib(raw["after_load"]["bare"]["rss_kb"]),
            notes={
                "threads": [
                    raw["after_load"]["rtmanager"]["threads"],
                    raw["after_load"]["bare"]["threads"],
                ]
            },
        ),
        Row(
            NAME,
            "peak (whole run)",
            "VmHWM",
            "MiB",
            mib(raw["after_load"]["rtmanager"]["hwm_kb"]),
            mib(raw["after_load"]["bare"]["hwm_kb"]),
        ),
    ]
    return {
        "params": asdict(params),
        "rows": [row.to_json() for row in rows],
        "raw": {"proc_status": raw, "load_calls": load},
    }
