"""The fields of `/proc/<pid>/stat`, for tests and benchmarks that watch processes."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, None when the pid is gone.

    Index 0 is the state letter (field 3 in proc(5)), 11 and 12 the user and
    system CPU time in clock ticks (fields 14, 15), 19 the start time
    (field 22). The command name is skipped whole: it may hold spaces and
    parentheses.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()
