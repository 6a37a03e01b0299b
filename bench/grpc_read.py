"""Read path: `GetRuntime` and `ListRuntimes(page_size=100)` latency and throughput.

rtmanager: the real `rtmanager serve` process on its own schema seeded with
100 stopped records (auth and metrics off). Floor: `bench.bare_server`, a
bare `RuntimeService` in its own process answering the same bytes from
memory, with the same thread pool and channel options.

Both are driven by the same client — raw generated stubs on one shared
channel, 1 or 8 threads in this process — in alternating rounds, so both
see the same machine conditions. Each round is bounded by time and by a
call count. `GetRuntime` cycles through the 100 seeded game ids.

ratio = rtmanager / bare: above 1 for latency means slower; below 1 for
throughput means fewer calls per second.

Each round also counts CPU time (user + system, from /proc) spent per call:
by the server process; by PostgreSQL (every `postgres` process on the
machine, so the machine must be otherwise quiet; the bare server uses
none); and by this client process. On a machine whose cores the client,
the server and PostgreSQL share, throughput follows the sum.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from bench.common import (
    BareServer,
    Isolation,
    Row,
    bare_server,
    isolation,
    latency_summary,
    log,
    rtmanager_server,
)
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2 as pb
from rtmanager._proto.galaxy.rtmanager.v1 import rtmanager_pb2_grpc as pb_grpc
from tests.e2e.conftest import ServerProcess
from tests.support.procfs import stat_fields

NAME = "grpc_read"
SEED = 100
PAGE_SIZE = 100
CALL_TIMEOUT = 10.0
CASES: tuple[tuple[str, int], ...] = (
    ("GetRuntime", 1),
    ("GetRuntime", 8),
    ("ListRuntimes", 1),
    ("ListRuntimes", 8),
)


@dataclass(frozen=True)
class ReadParams:
    """How long each case runs, per target."""

    seconds: float
    """Measured seconds per case and target, split over `rounds`."""
    rounds: int
    warmup: float
    """Unmeasured seconds before each round."""
    max_calls: int
    """Upper bound of calls per round and target."""


DEFAULT = ReadParams(seconds=5.0, rounds=2, warmup=0.5, max_calls=100_000)
QUICK = ReadParams(seconds=1.0, rounds=2, warmup=0.2, max_calls=20_000)


@dataclass
class LoadResult:
    """Latencies and counts of one or more load rounds."""

    latencies: list[float] = field(default_factory=list)
    calls: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds spent during the rounds, by `CpuMeter` part."""

    def add(self, other: LoadResult) -> None:
        """Fold another round into this one."""
        self.latencies.extend(other.latencies)
        self.calls += other.calls
        self.errors += other.errors
        self.seconds += other.seconds
        for part, seconds in other.cpu.items():
            self.cpu[part] = self.cpu.get(part, 0.0) + seconds

    def cpu_per_call_us(self, *parts: str) -> float:
        """CPU microseconds per call spent by `parts` together."""
        spent = sum(self.cpu.get(part, 0.0) for part in parts)
        return spent / self.calls * 1e6 if self.calls else 0.0

    @property
    def throughput(self) -> float:
        """Successful calls per second of wall time."""
        return (self.calls - self.errors) / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        """Latency percentiles plus counts, JSON-ready."""
        return {
            **latency_summary(self.latencies),
            "calls": self.calls,
            "errors": self.errors,
            "seconds": self.seconds,
            "throughput_per_s": self.throughput,
            "cpu_per_call_us": {part: self.cpu_per_call_us(part) for part in self.cpu},
        }


CPU_PARTS = ("server", "postgres", "client")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 once it is gone)."""
    fields = stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


@dataclass(frozen=True)
class CpuMeter:
    """CPU time of a server process, of PostgreSQL and of this process."""

    server_pid: int

    def sample(self) -> dict[str, float]:
        """CPU seconds so far, by part."""
        return {
            "server": _cpu_seconds(self.server_pid),
            "postgres": sum(_cpu_seconds(pid) for pid in _postgres_pids()),
            "client": time.process_time(),
        }

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """CPU seconds by part between two samples."""
        return {part: max(0.0, after[part] - before[part]) for part in before}


class ReadClient:
    """Raw stubs on one channel to one server."""

    def __init__(self, address: str, game_ids: list[str]) -> None:
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        )
        self.stub = pb_grpc.RuntimeServiceStub(self.channel)
        self._gets = [pb.GetRuntimeRequest(game_id=game_id) for game_id in game_ids]
        self._list = pb.ListRuntimesRequest(page_size=PAGE_SIZE)

    def call(self, rpc: str) -> Callable[[int], object]:
        """A function making the `rpc` call number `i`."""
        if rpc == "GetRuntime":
            gets, get = self._gets, self.stub.GetRuntime
            return lambda i: get(gets[i % len(gets)], timeout=CALL_TIMEOUT)
        if rpc == "ListRuntimes":
            request, list_runtimes = self._list, self.stub.ListRuntimes
            return lambda i: list_runtimes(request, timeout=CALL_TIMEOUT)
        raise ValueError(f"unknown rpc {rpc}")

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()


def run_load(
    call: Callable[[int], object], *, concurrency: int, seconds: float, max_calls: int
) -> LoadResult:
    """Call from `concurrency` threads until `seconds` pass or `max_calls` are made."""
    claims = itertools.count()
    start = threading.Barrier(concurrency + 1)
    deadline = [0.0]
    per_thread: list[LoadResult] = [LoadResult() for _ in range(concurrency)]

    def worker(k: int) -> None:
        mine = per_thread[k]
        clock = time.perf_counter
        start.wait()
        stop_at = deadline[0]
        i = k
        while next(claims) < max_calls and clock() < stop_at:
            began = clock()
            try:
                call(i)
            except grpc.RpcError:
                mine.errors += 1
            mine.latencies.append(clock() - began)
            mine.calls += 1
            i += concurrency

    threads = [
        threading.Thread(target=worker, args=(k,), name=f"load-{k}", daemon=True)
        for k in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join(seconds + 2 * CALL_TIMEOUT)
    elapsed = time.perf_counter() - began
    total = LoadResult(seconds=elapsed)
    for part in per_thread:
        total.latencies.extend(part.latencies)
        total.calls += part.calls
        total.errors += part.errors
    return total


def measure_case(
    clients: dict[str, ReadClient],
    rpc: str,
    concurrency: int,
    params: ReadParams,
    meters: dict[str, CpuMeter] | None = None,
) -> dict[str, LoadResult]:
    """Alternate rounds over the targets; return each target's merged result
    (with the CPU each target's meter counted during its measured rounds)."""
    results = {name: LoadResult() for name in clients}
    names = list(clients)
    per_round = params.seconds / params.rounds
    for round_no in range(params.rounds):
        order = names if round_no % 2 == 0 else list(reversed(names))
        for name in order:
            call = clients[name].call(rpc)
            run_load(
                call,
                concurrency=concurrency,
                seconds=params.warmup,
                max_calls=params.max_calls,
            )
            meter = (meters or {}).get(name)
            before = meter.sample() if meter else {}
            measured = run_load(
                call, concurrency=concurrency, seconds=per_round, max_calls=params.max_calls
            )
            if meter:
                measured.cpu = meter.spent(before, meter.sample())
            results[name].add(measured)
    return results


@contextlib.contextmanager
def read_servers(iso: Isolation, seed: int = SEED) -> Iterator[tuple[ServerProcess, BareServer]]:
    """A seeded rtmanager server and a bare server answering the same records."""
    with rtmanager_server(iso, seed=seed) as server:
        with grpc.insecure_channel(server.address) as channel:
            page = pb_grpc.RuntimeServiceStub(channel).ListRuntimes(
                pb.ListRuntimesRequest(page_size=seed), timeout=CALL_TIMEOUT
            )
        if len(page.runtimes) != seed:
            raise RuntimeError(f"seeded {seed} records but the server lists {len(page.runtimes)}")
        records = iso.workdir / "records.bin"
        records.write_bytes(page.SerializeToString())
        with bare_server(iso, records) as bare:
            yield server, bare


def seeded_game_ids(seed: int = SEED) -> list[str]:
    """The game ids `bench.common.seed_records` writes."""
    return [f"seed-{index:03d}" for index in range(seed)]


def reply_sizes(clients: dict[str, ReadClient]) -> dict[str, dict[str, int]]:
    """Serialized reply sizes per target; the servers must answer the same bytes."""
    sizes: dict[str, dict[str, int]] = {}
    replies: dict[str, tuple[bytes, bytes]] = {}
    for name, client in clients.items():
        got = client.stub.GetRuntime(pb.GetRuntimeRequest(game_id="seed-042"), timeout=10)
        listed = client.stub.ListRuntimes(
            pb.ListRuntimesRequest(page_size=PAGE_SIZE), timeout=CALL_TIMEOUT
        )
        replies[name] = (got.SerializeToString(), listed.SerializeToString())
        sizes[name] = {"GetRuntime": len(replies[name][0]), "ListRuntimes": len(replies[name][1])}
    if len(set(replies.values())) != 1:
        raise RuntimeError(f"the servers answer different bytes: {sizes}")
    return sizes


def run(*, quick: bool = False) -> dict[str, Any]:
    """Run every read case against both servers; return rows and raw numbers."""
    params = QUICK if quick else DEFAULT
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    with isolation(NAME) as iso, read_servers(iso) as (server, bare):
        game_ids = seeded_game_ids()
        clients = {
            "rtmanager": ReadClient(server.address, game_ids),
            "bare": ReadClient(bare.address, game_ids),
        }
        meters = {
            "rtmanager": CpuMeter(server.process.pid),
            "bare": CpuMeter(bare.process.pid),
        }
        try:
            sizes = reply_sizes(clients)
            for rpc, concurrency in CASES:
                case = f"{rpc} x{concurrency}"
                log(f"{NAME}: {case}")
                results = measure_case(clients, rpc, concurrency, params, meters)
                ours, floor = results["rtmanager"], results["bare"]
                raw[case] = {name: result.summary() for name, result in results.items()}
                a, b = raw[case]["rtmanager"], raw[case]["bare"]
                for metric in ("p50_ms", "p90_ms", "p99_ms"):
                    rows.append(
                        Row(NAME, case, f"latency {metric[:3]}", "ms", a[metric], b[metric])
                    )
                rows.append(
                    Row(
                        NAME,
                        case,
                        "throughput",
                        "calls/s",
                        ours.throughput,
                        floor.throughput,
                        notes={"calls": [ours.calls, floor.calls]},
                    )
                )
                for metric, parts in (
                    ("cpu per call: server", ("server",)),
                    ("cpu per call: server + PostgreSQL", ("server", "postgres")),
                    ("cpu per call: server + PostgreSQL + client", CPU_PARTS),
                ):
                    rows.append(
                        Row(
                            NAME,
                            case,
                            metric,
                            "us",
                            ours.cpu_per_call_us(*parts),
                            floor.cpu_per_call_us(*parts),
                        )
                    )
                if ours.errors or floor.errors:
                    log(f"{NAME}: {case}: errors rtmanager={ours.errors} bare={floor.errors}")
        finally:
            for client in clients.values():
                client.close()
    return {
        "params": {**asdict(params), "seed_records": SEED, "page_size": PAGE_SIZE},
        "reply_bytes": sizes,
        "rows": [row.to_json() for row in rows],
        "raw": raw,
    }
