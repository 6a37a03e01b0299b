"""Run every benchmark, print the table of ratios and write the raw numbers as JSON.

    .venv/bin/python -m bench.run [--quick] [--out FILE] [--only NAME[,NAME]]

From the repository root, after `bash scripts/bootstrap.sh`. Exit status 0
when every benchmark ran, 1 when one failed (the others still run and the
JSON holds the error), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import (
    grpc_read,
    lifecycle,
    lobby_jobs,
    memory,
    reconcile,
    start_concurrency,
    swarm,
    watch_fanout,
)
from bench.common import cpu_count, log
from tests.e2e.conftest import REPO

BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    grpc_read.NAME: grpc_read.run,
    lifecycle.NAME: lifecycle.run,
    memory.NAME: memory.run,
    reconcile.NAME: reconcile.run,
    start_concurrency.NAME: start_concurrency.run,
    lobby_jobs.NAME: lobby_jobs.run,
    watch_fanout.NAME: watch_fanout.run,
    swarm.NAME: swarm.run,
}
DEFAULT_OUT = REPO / "bench" / "results.json"


def _command_output(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.partition(":")[2].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    commit = _command_output("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    dirty = bool(_command_output("git", "-C", str(REPO), "status", "--porcelain"))
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": cpu_count(),
        "cpu_model": cpu_model,
        "memory_mib": mem_kb // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker": _command_output("docker", "version", "--format", "{{.Server.Version}}"),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "loadavg_at_start": loadavg(),
    }


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews both sides."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: dict[str, Any]) -> str:
    """The rows of every benchmark as a Markdown table."""
    lines = [
        "| benchmark | case | metric | rtmanager | floor | ratio |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"| {name} | FAILED: {result['error']} | | | | |")
            continue
        for row in result["rows"]:
            lines.append(
                f"| {row['benchmark']} | {row['case']} | {row['metric']} ({row['unit']}) "
                f"| {_fmt(row['rtmanager'])} | {_fmt(row['floor'])} | {_fmt(row['ratio'])} |"
            )
    return "\n".join(lines)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Unwind through the benchmarks' finally blocks, which clean up.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the chosen benchmarks, report."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke check")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file ({DEFAULT_OUT})")
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {', '.join(BENCHMARKS)}",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown or not chosen:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")

    signal.signal(signal.SIGTERM, _terminate)
    report: dict[str, Any] = {"machine": machine(), "quick": args.quick, "benchmarks": {}}
    failed = False
    began = time.monotonic()
    for name in chosen:
        log(f"running {name}{' (quick)' if args.quick else ''}")
        started = time.monotonic()
        try:
            result = BENCHMARKS[name](quick=args.quick)
        except KeyboardInterrupt:
            log(f"interrupted during {name}; everything it created has been removed")
            return 130
        except Exception as error:
            failed = True
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}"}
        result["wall_seconds"] = round(time.monotonic() - started, 2)
        report["benchmarks"][name] = result
    report["wall_seconds"] = round(time.monotonic() - began, 2)
    report["machine"]["loadavg_at_end"] = loadavg()

    info = report["machine"]
    print(
        f"rtmanager benchmarks, {info['date_utc']}, {info['cpus']} CPUs ({info['cpu_model']}), "
        f"commit {info['git_commit']}{', quick' if args.quick else ''}, "
        f"load average {info['loadavg_at_start']} -> {info['loadavg_at_end']}; "
        f"ratio = rtmanager / floor"
    )
    print(table(report["benchmarks"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    print(f"raw numbers: {args.out}  (total {report['wall_seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
