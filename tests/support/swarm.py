"""A Docker Swarm of several private `dockerd` nodes, each in its own network namespace.

For the swarm tests, the chaos soak and the benchmarks (SPEC §10): a real
multi-node swarm on one machine, separate from the shared daemon and gone
without a trace afterwards.

    with SwarmCluster(nodes=3, log_dir=tmp_path) as cluster:
        client = cluster.manager.client()            # docker-py, on the manager
        env["RTMANAGER_DOCKER_HOST"] = cluster.manager_url
        ...
        cluster.stop_node(2)                         # SIGTERM that worker's dockerd
        cluster.wait_node_status(2, "down")          # (kill=True: SIGKILL the whole node)
        cluster.start_node(2)                        # back, Ready again

Options worth knowing: `nodes`, `managers` (default 1: node 1 manages,
the others are workers), `images` (what to copy from the host's daemon),
`node_labels` ({index: {label: value}} for placement constraints),
`heartbeat` (seconds, default 1: a stopped worker is `down` after about
2-5 s; Docker's default of 5 s makes it about 15 s, and a stopped manager
takes about 40 s), `swarm=False` (the daemons only, no init/join),
`log_dir`.

What it builds (root only; `ip`, `nsenter`, `unshare`, `dockerd`, `docker`):

* A run id (6 hex digits); everything of the run is named after it: the
  directory `/tmp/rtmsw/<run>/` (one sub-directory per node with its
  `--data-root`, `--exec-root`, socket and pid file; an `owner` file naming
  the process that owns the run) and the network namespaces
  `rtmsw-<run>-br` (holding only the Linux bridge `br0`) and
  `rtmsw-<run>-n1` … `-nN` (one per node).
* Node i has `eth0` in its namespace, the peer of veth `v<i>` on `br0`,
  with address `10.213.0.(10+i)/24` (`subnet`). The veths are created
  inside the bridge namespace with their peer placed straight into the node
  namespace, so no interface ever appears in the host's namespace and the
  host has no address on the range; the namespaces have no route beyond the
  subnet, so nothing a node does can reach any other network (a registry
  look-up fails at once with "network is unreachable").
* Each `dockerd` runs as
  `nsenter --net=/run/netns/<ns> -- unshare --uts --mount --propagation slave
  -- sh -c 'hostname <ns>; exec dockerd …'` with
  `--iptables=false --ip-masq=false --bridge=none --userland-proxy=false`,
  its own config file (no /etc/docker/daemon.json, its own engine key) and
  `DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1` (swarm tasks use the loaded image
  without trying a registry first). `nsenter --net`, not `ip netns exec`:
  the latter remounts /sys and hides the cgroup mounts ("Devices cgroup
  isn't mounted"). The UTS namespace gives each node its own host name (the
  namespace name), so `docker node ls` tells them apart by hostname as well
  as by node id. The mount namespace (a slave of the host's) keeps every
  mount the daemon makes (overlay layers, network namespace files) out of
  the host's mount table and makes them vanish with the node's processes.
* Images (`images`, by default the local engine test images) are exported
  once from the host's daemon with `docker save` (retried for a bounded
  time: the shared daemon may be restarting) and `docker load`ed into every
  node.
* `swarm init` on node 1 with its namespace address as advertise and
  listen address (and a short dispatcher heartbeat, `heartbeat`, so a lost
  node turns `down` within seconds); nodes 2…`managers` join as managers,
  the rest as workers. The default, 1 manager and N-1 workers, keeps the
  swarm usable when a worker is stopped; with 3 managers one of them may be
  stopped without losing the raft quorum.

Teardown (`close()`, also when `start()` fails, on an exception or Ctrl-C
inside the `with` block): SIGTERM to every dockerd (they stop their
containers and their containerd) for `stop_timeout` seconds, then SIGKILL to
whatever is left of the run (processes whose command line names the run's
directory, processes in its namespaces and all their descendants: dockerd,
containerd, shims, container processes), unmount anything left under the
run directory (lazily if busy), delete the namespaces (which destroys the
veths and the bridge) and the directory. `leftovers()` lists whatever of
the run still exists (empty after a clean teardown).

A run whose owner was killed (kill -9, a lost CI job) leaves all of that
behind; `SwarmCluster.cleanup_stale()` removes every run under the prefix
whose owner process is gone, and `start()` calls it first. (A run's owner
is found through prefix -> root, so a `root` other than the default needs a
`prefix` of its own.) The owner is a
pid plus its start time, so a reused pid is not mistaken for the owner.

Processes killed with SIGKILL whose parent died with them are reparented
to pid 1, which on these machines does not reap them promptly: they stay
zombies for a while (harmless; nothing here counts a zombie as running,
and a restarted node's stale containerd pid file is removed first).

Every wait is bounded and fails with `SwarmError` carrying the tail of the
relevant dockerd logs. Logs go to `log_dir/<node>.log` when `log_dir` is
given (they survive the teardown), else into the node's directory.

From a shell (or a benchmark that wants the swarm in another process):

    .venv/bin/python -m tests.support.swarm up --nodes 3   # prints the nodes as JSON, Ctrl-C ends
    .venv/bin/python -m tests.support.swarm cleanup        # remove stale runs
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import docker
import docker.errors
import requests.exceptions

from tests.support.procfs import stat_fields

DEFAULT_IMAGES: tuple[str, ...] = (
    "galaxy/engine-stub:1.0.0",
    "galaxy/engine-stub:1.0.1",
    "galaxy/engine-stub:1.1.0",
    "galaxy/engine-crash:1.0.0",
)
DEFAULT_PREFIX = "rtmsw"
DEFAULT_ROOT = Path("/tmp/rtmsw")
DEFAULT_SUBNET = "10.213.0.0/24"
HOST_DOCKER = "unix:///var/run/docker.sock"
REQUIRED_TOOLS = ("ip", "nsenter", "unshare", "dockerd", "docker", "umount", "hostname")
SWARM_PORT = 2377
_BRIDGE = "br0"
_LOG_TAIL_LINES = 25
_YOUNG_RUN_SECONDS = 60
_MAX_SOCKET_PATH = 107

T = TypeVar("T")


class SwarmError(RuntimeError):
    """The swarm could not be built, changed or torn down as asked."""


def missing_requirements() -> list[str]:
    """Why a swarm cannot be built here (empty when it can): not root, or a tool missing."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (network namespaces, dockerd)")
    reasons.extend(f"{tool} is not on PATH" for tool in REQUIRED_TOOLS if not shutil.which(tool))
    return reasons


# --------------------------------------------------------------------------- commands


def _run(
    cmd: Sequence[str], *, timeout: float = 30.0, check: bool = True, what: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run a command (no shell), bounded in time; a failure is a SwarmError with its stderr."""
    try:
        result = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SwarmError(f"{what or cmd[0]}: `{' '.join(cmd)}` took over {timeout}s") from exc
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise SwarmError(
            f"{what or cmd[0]}: `{' '.join(cmd)}` exited {result.returncode}: {detail}"
        )
    return result


def _docker_cli(url: str, *args: str, timeout: float = 60.0, what: str = "") -> str:
    """The `docker` CLI against the daemon at `url` (`unix://…`); returns stdout."""
    return _run(
        ["docker", "-H", url, *args], timeout=timeout, what=what or f"docker {args[0]}"
    ).stdout


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.25,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll `probe` until it returns something truthy; SwarmError after `timeout` seconds.

    `probe` may raise docker or requests errors while a daemon is coming up;
    they count as "not yet" and the last one is quoted on timeout. `detail`
    adds context (e.g. log tails) to the error.
    """
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            value = probe()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            value, last_error = None, f"{type(exc).__name__}: {exc}"
        if value:
            return value
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:.0f}s waiting for {what}"
            if last_error:
                message += f" (last error: {last_error})"
            if detail is not None:
                message += "\n" + detail()
            raise SwarmError(message)
        time.sleep(interval)


# --------------------------------------------------------------------------- processes


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None when the pid is gone."""
    fields = stat_fields(pid)
    return None if fields is None else fields[19]


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid → (parent pid, state letter, command line) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), fields[0], cmdline)
    return table


def _netns_pids(name: str) -> set[int]:
    """Pids of the processes in network namespace `name` (empty when it does not exist)."""
    result = _run(["ip", "netns", "pids", name], check=False, timeout=10)
    return {int(word) for word in result.stdout.split() if word.isdigit()}


def _processes_of(markers: Iterable[str], namespaces: Iterable[str]) -> set[int]:
    """Live (non-zombie) processes of a run or node, with all their descendants.

    A process belongs when its command line contains one of `markers` (the
    run's or node's directory: dockerd, containerd, shims) or it sits in
    one of `namespaces`; descendants cover the container processes under a
    shim. This process and its ancestors are never included.
    """
    table = _proc_table()
    markers = [m for m in markers if m]
    roots = {pid for pid, (_, _, cmd) in table.items() if any(m in cmd for m in markers)}
    for name in namespaces:
        roots |= _netns_pids(name)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [pid for pid in roots if pid in table]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    protected = set()
    pid = os.getpid()
    while pid > 0 and pid not in protected:
        protected.add(pid)
        pid = table.get(pid, (0, "", ""))[0]
    return {pid for pid in found - protected if table[pid][1] != "Z"}


def _kill_all(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _kill_and_wait(
    markers: Iterable[str], namespaces: Iterable[str], *, timeout: float = 15.0
) -> set[int]:
    """SIGKILL everything `_processes_of` finds, until nothing is left; returns survivors."""
    markers, namespaces = list(markers), list(namespaces)
    deadline = time.monotonic() + timeout
    while True:
        pids = _processes_of(markers, namespaces)
        if not pids or time.monotonic() >= deadline:
            return pids
        _kill_all(pids)
        time.sleep(0.1)


# --------------------------------------------------------------------------- mounts and namespaces


def _mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory` in this mount namespace, deepest first."""
    prefix = str(directory).rstrip("/")
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # \040 etc.
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _unmount_under(directory: Path) -> list[str]:
    """Unmount everything below `directory` (lazily when busy); returns what stays mounted."""
    for point in _mounts_under(directory):
        if _run(["umount", point], check=False, timeout=20).returncode != 0:
            _run(["umount", "-l", point], check=False, timeout=20)
    return _mounts_under(directory)


def _netns_list() -> list[str]:
    result = _run(["ip", "netns", "list"], check=False, timeout=10)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _delete_netns(names: Iterable[str]) -> None:
    present = set(_netns_list())
    for name in names:
        if name in present:
            _run(["ip", "netns", "delete", name], check=False, timeout=20)


def _read_owner(run_dir: Path) -> tuple[int, str] | None:
    try:
        data = json.loads((run_dir / "owner").read_text())
        return int(data["pid"]), str(data["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _owner_alive(run_dir: Path) -> bool:
    """True while the run's owner process lives (or the run is being set up right now)."""
    owner = _read_owner(run_dir)
    if owner is None:
        # The owner file is written right after the directory is made; a young
        # directory without one is a run being set up, not a stale one.
        with contextlib.suppress(OSError):
            return time.time() - run_dir.stat().st_mtime < _YOUNG_RUN_SECONDS
        return False
    return _proc_start_time(owner[0]) == owner[1]


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path}: no log)"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- nodes


@dataclass
class SwarmNode:
    """One dockerd of the swarm: its namespace, address, socket, logs and swarm identity."""

    index: int  # 1-based
    name: str  # also its network namespace and its host name
    address: str
    role: Literal["manager", "worker"]
    directory: Path
    log_path: Path
    node_id: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _mnt_ns: str = field(default="", repr=False)

    @property
    def netns(self) -> str:
        return self.name

    @property
    def hostname(self) -> str:
        return self.name

    @property
    def socket_path(self) -> Path:
        return self.directory / "docker.sock"

    @property
    def url(self) -> str:
        """The Docker endpoint, `unix:///…/docker.sock` (docker-py base_url or `docker -H`)."""
        return f"unix://{self.socket_path}"

    @property
    def data_root(self) -> Path:
        return self.directory / "data"

    @property
    def exec_root(self) -> Path:
        return self.directory / "exec"

    @property
    def pidfile(self) -> Path:
        return self.directory / "docker.pid"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, timeout: float = 30.0) -> docker.DockerClient:
        """A new docker-py client on this node (the caller closes it)."""
        return docker.DockerClient(base_url=self.url, timeout=int(timeout), version="auto")

    def docker(self, *args: str, timeout: float = 60.0) -> str:
        """Run the `docker` CLI against this node; returns its stdout."""
        return _docker_cli(self.url, *args, timeout=timeout)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return f"--- {self.name} dockerd log ({self.log_path}), last lines:\n" + _tail(
            self.log_path, lines
        )

    def ping(self) -> bool:
        """True when the daemon answers on its socket."""
        if not self.socket_path.exists():
            return False
        api = docker.APIClient(base_url=self.url, timeout=3, version="1.41")
        try:
            return bool(api.ping())
        finally:
            api.close()

    def swarm_info(self) -> dict[str, Any]:
        """`docker info`'s Swarm section, as this node sees itself."""
        api = docker.APIClient(base_url=self.url, timeout=10, version="1.41")
        try:
            return dict(api.info().get("Swarm") or {})
        finally:
            api.close()

    def describe(self) -> dict[str, Any]:
        """What a benchmark or soak needs to address the node (JSON-friendly)."""
        return {
            "index": self.index,
            "name": self.name,
            "hostname": self.hostname,
            "netns": self.netns,
            "address": self.address,
            "url": self.url,
            "role": self.role,
            "node_id": self.node_id,
            "log": str(self.log_path),
        }


# --------------------------------------------------------------------------- the cluster


class SwarmCluster:
    """N private dockerd nodes in one swarm; a context manager that always tears down.

    Attributes once started: `nodes` (1-based `index`, list position
    index-1), `manager` (node 1), `manager_url`, `run_id`, `run_dir`.
    Node arguments of the methods are 1-based node indexes.
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        managers: int = 1,
        images: Sequence[str] = DEFAULT_IMAGES,
        source_docker_host: str = HOST_DOCKER,
        subnet: str = DEFAULT_SUBNET,
        prefix: str = DEFAULT_PREFIX,
        root: Path = DEFAULT_ROOT,
        log_dir: Path | None = None,
        heartbeat: float = 1.0,
        start_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        image_export_timeout: float = 150.0,
        node_labels: dict[int, dict[str, str]] | None = None,
        swarm: bool = True,
        prefer_offline_images: bool = True,
    ) -> None:
        if nodes < 1 or not 1 <= managers <= nodes:
            raise ValueError("need 1 <= managers <= nodes")
        if (prefix == DEFAULT_PREFIX) != (root == DEFAULT_ROOT):
            # cleanup_stale finds a run's owner through prefix -> root; two
            # roots under one prefix would see each other's runs as stale.
            raise ValueError("a root of its own needs a prefix of its own (and vice versa)")
        network = ipaddress.ip_network(subnet)
        if network.num_addresses < nodes + 12:
            raise ValueError(f"subnet {subnet} is too small for {nodes} nodes")
        self.node_count = nodes
        self.manager_count = managers
        self.images = tuple(images)
        self.source_docker_host = source_docker_host
        self.subnet = network
        self.prefix = prefix
        self.root = root
        self.log_dir = log_dir
        self.heartbeat = heartbeat
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.image_export_timeout = image_export_timeout
        self.node_labels = node_labels or {}
        self.form_swarm = swarm
        self.prefer_offline_images = prefer_offline_images
        self.run_id = secrets.token_hex(3)
        self.run_dir = root / self.run_id
        # Unix socket paths are limited to 107 bytes; containerd's is the longest.
        longest = f"{self.run_dir}/n{nodes}/exec/containerd/containerd.sock.ttrpc"
        if len(longest.encode()) > _MAX_SOCKET_PATH:
            raise ValueError(f"root {root} is too long for the daemons' unix sockets")
        self.bridge_netns = f"{prefix}-{self.run_id}-br"
        self.nodes: list[SwarmNode] = []
        self._closed = False
        self._started = False

    # ---- naming

    @property
    def netns_names(self) -> list[str]:
        """Every namespace of the run: the nodes', then the bridge's."""
        return [node.netns for node in self.nodes] + [self.bridge_netns]

    @property
    def manager(self) -> SwarmNode:
        return self.nodes[0]

    @property
    def manager_url(self) -> str:
        """The manager's endpoint (`unix://…`): RTMANAGER_DOCKER_HOST for the swarm backend."""
        return self.manager.url

    def node(self, index: int) -> SwarmNode:
        """Node `index` (1-based)."""
        if not 1 <= index <= len(self.nodes):
            raise IndexError(f"no node {index} (nodes are 1..{len(self.nodes)})")
        return self.nodes[index - 1]

    def manager_client(self, timeout: float = 30.0) -> docker.DockerClient:
        """A docker-py client on node 1, the first manager (the caller closes it)."""
        return self.manager.client(timeout)

    def live_manager(self) -> SwarmNode:
        """The first manager whose dockerd runs (node 1 unless it was stopped)."""
        for node in self.nodes:
            if node.role == "manager" and node.running:
                return node
        raise SwarmError("no manager of the swarm is running")

    def log_tails(self, nodes: Iterable[SwarmNode] | None = None) -> str:
        return "\n".join(node.log_tail() for node in (self.nodes if nodes is None else nodes))

    # ---- context manager

    def __enter__(self) -> SwarmCluster:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # A teardown failure while an exception propagates must not hide it.
        self.close(raise_on_leftovers=exc_type is None)

    # ---- set-up

    def start(self) -> None:
        """Build the namespaces, start the daemons, load images, form the swarm."""
        if self._started:
            raise SwarmError("this cluster was already started")
        problems = missing_requirements()
        if problems:
            raise SwarmError("cannot build a swarm here: " + "; ".join(problems))
        self._started = True
        try:
            with _deferred_sigint():
                self.cleanup_stale(prefix=self.prefix, root=self.root)
                self._claim_run_dir()
            self._build_network()
            self._start_daemons()
            self._load_images()
            if self.form_swarm:
                self._form_swarm()
        except BaseException:
            self.close(raise_on_leftovers=False)
            raise

    def _claim_run_dir(self) -> None:
        # The directory and its owner file come first: cleanup_stale treats a
        # namespace without a live owner as stale.
        self.run_dir.mkdir(parents=True, exist_ok=False)
        start_time = _proc_start_time(os.getpid())
        (self.run_dir / "owner").write_text(
            json.dumps({"pid": os.getpid(), "start_time": start_time, "argv": sys.argv})
        )
        (self.run_dir / "daemon.json").write_text("{}\n")
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        first = int(self.subnet.network_address)
        for index in range(1, self.node_count + 1):
            name = f"{self.prefix}-{self.run_id}-n{index}"
            directory = self.run_dir / f"n{index}"
            directory.mkdir()
            log_path = self.log_dir / f"{name}.log" if self.log_dir else directory / "dockerd.log"
            self.nodes.append(
                SwarmNode(
                    index=index,
                    name=name,
                    address=str(ipaddress.ip_address(first + 10 + index)),
                    role="manager" if index <= self.manager_count else "worker",
                    directory=directory,
                    log_path=log_path,
                )
            )

    def _build_network(self) -> None:
        ns = self.bridge_netns
        _run(["ip", "netns", "add", ns], what="bridge namespace")
        _run(["ip", "-n", ns, "link", "add", _BRIDGE, "type", "bridge"], what="bridge")
        _run(["ip", "-n", ns, "link", "set", _BRIDGE, "up"], what="bridge")
        prefix_len = self.subnet.prefixlen
        for node in self.nodes:
            veth = f"v{node.index}"
            _run(["ip", "netns", "add", node.netns], what=f"namespace of {node.name}")
            # Created in the bridge namespace with the peer placed directly
            # into the node's: nothing ever appears in the host's namespace.
            _run(
                ["ip", "-n", ns, "link", "add", veth, "type", "veth",
                 "peer", "name", "eth0", "netns", node.netns],
                what=f"veth of {node.name}",
            )  # fmt: skip
            _run(["ip", "-n", ns, "link", "set", veth, "master", _BRIDGE, "up"], what="veth")
            _run(
                ["ip", "-n", node.netns, "addr", "add", f"{node.address}/{prefix_len}",
                 "dev", "eth0"],
                what=f"address of {node.name}",
            )  # fmt: skip
            _run(["ip", "-n", node.netns, "link", "set", "eth0", "up"], what="eth0")
            _run(["ip", "-n", node.netns, "link", "set", "lo", "up"], what="lo")

    def _dockerd_command(self, node: SwarmNode) -> list[str]:
        return [
            "nsenter", f"--net=/run/netns/{node.netns}", "--",
            "unshare", "--uts", "--mount", "--propagation", "slave", "--",
            "/bin/sh", "-c", 'hostname "$0" && exec "$@"', node.hostname,
            "dockerd",
            "--config-file", str(node.directory / "daemon.json"),
            "--data-root", str(node.data_root),
            "--exec-root", str(node.exec_root),
            "-H", node.url,
            "--pidfile", str(node.pidfile),
            "--iptables=false", "--ip-masq=false", "--bridge=none",
            "--userland-proxy=false",
        ]  # fmt: skip

    def _launch(self, node: SwarmNode) -> None:
        if node.running:
            raise SwarmError(f"{node.name} is already running")
        # A killed daemon leaves its pid file and socket behind, and the pid
        # file of its containerd: dockerd waits for a containerd whose pid is
        # "alive", and a zombie is (pid 1 here does not reap orphans promptly),
        # so it would time out with "timeout waiting for containerd to start".
        leftover = _processes_of([f"{node.directory}/"], [node.netns])
        if leftover:
            raise SwarmError(f"{node.name}: processes {sorted(leftover)} still run; stop it first")
        node.pidfile.unlink(missing_ok=True)
        node.socket_path.unlink(missing_ok=True)
        (node.exec_root / "containerd" / "containerd.pid").unlink(missing_ok=True)
        # Its own engine key instead of /etc/docker/key.json (shared with the
        # host's daemon), and nothing from the host's daemon.json.
        config = {"deprecated-key-path": str(node.directory / "key.json")}
        (node.directory / "daemon.json").write_text(json.dumps(config) + "\n")
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        if self.prefer_offline_images:
            # Otherwise a swarm task whose image is a tag (not an id or a
            # digest) first tries to pull it, and only then uses the local one.
            env["DOCKER_SERVICE_PREFER_OFFLINE_IMAGE"] = "1"
        with node.log_path.open("ab") as log:
            log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {node.name}\n".encode())
            log.flush()
            node.process = subprocess.Popen(
                self._dockerd_command(node),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal reaches the harness, not dockerd
            )

    def _wait_daemon(self, node: SwarmNode, timeout: float) -> None:
        def up() -> bool:
            if not node.running:
                code = node.process.returncode if node.process else None
                raise SwarmError(f"{node.name}: dockerd exited with {code}\n{node.log_tail()}")
            return node.ping()

        wait_until(up, timeout=timeout, what=f"dockerd of {node.name}", detail=node.log_tail)

    def _start_daemons(self) -> None:
        for node in self.nodes:
            self._launch(node)
        for node in self.nodes:
            self._wait_daemon(node, self.start_timeout)

    def _load_images(self) -> None:
        if not self.images:
            return
        archive = self.run_dir / "images.tar"
        self._export_images(archive)
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            futures = [
                pool.submit(
                    node.docker, "load", "-q", "-i", str(archive), timeout=self.start_timeout * 2
                )
                for node in self.nodes
            ]
            for future in futures:
                future.result()
        archive.unlink()

    def _export_images(self, archive: Path) -> None:
        """`docker save` from the source daemon, retried while it is unreachable."""
        deadline = time.monotonic() + self.image_export_timeout
        while True:
            result = _run(
                ["docker", "-H", self.source_docker_host, "save", "-o", str(archive), *self.images],
                check=False,
                timeout=max(10.0, deadline - time.monotonic()),
                what="docker save",
            )
            if result.returncode == 0:
                return
            error = result.stderr.strip()
            if "No such image" in error or "reference does not exist" in error:
                raise SwarmError(
                    f"docker save {' '.join(self.images)}: {error} "
                    "(build the engine images with scripts/build-engine-images.sh)"
                )
            if time.monotonic() >= deadline:
                raise SwarmError(
                    f"could not export {', '.join(self.images)} from {self.source_docker_host} "
                    f"within {self.image_export_timeout:.0f}s: {error}"
                )
            time.sleep(3)

    def _form_swarm(self) -> None:
        manager = self.manager
        client = manager.client()
        try:
            client.swarm.init(
                advertise_addr=manager.address,
                listen_addr=f"{manager.address}:{SWARM_PORT}",
                dispatcher_heartbeat_period=int(self.heartbeat * 1e9),
            )
            tokens = client.swarm.attrs["JoinTokens"]
        finally:
            client.close()
        manager.node_id = str(manager.swarm_info()["NodeID"])
        # Managers one at a time (each join changes the raft membership).
        for node in self.nodes[1:]:
            joining = node.client()
            try:
                joining.swarm.join(
                    remote_addrs=[f"{manager.address}:{SWARM_PORT}"],
                    join_token=tokens["Manager" if node.role == "manager" else "Worker"],
                    listen_addr=f"{node.address}:{SWARM_PORT}",
                    advertise_addr=node.address,
                )
            except docker.errors.APIError as exc:
                raise SwarmError(f"{node.name} could not join: {exc}\n{node.log_tail()}") from exc
            finally:
                joining.close()
            node.node_id = str(node.swarm_info()["NodeID"])
        self.wait_nodes_ready()
        if self.node_labels:
            client = manager.client()
            try:
                for index, labels in self.node_labels.items():
                    swarm_node = client.nodes.get(self.node(index).node_id)
                    spec = swarm_node.attrs["Spec"]
                    spec["Labels"] = {**spec.get("Labels", {}), **labels}
                    swarm_node.update(spec)
            finally:
                client.close()

    # ---- observing

    def swarm_nodes(self) -> dict[str, dict[str, Any]]:
        """A running manager's view of the nodes: node id → the node's API object (attrs)."""
        client = self.live_manager().client(timeout=10)
        try:
            nodes: dict[str, dict[str, Any]] = {}
            for node in client.nodes.list():
                assert node.id is not None
                nodes[node.id] = node.attrs
            return nodes
        finally:
            client.close()

    def node_status(self, index: int) -> str:
        """`ready`, `down`, `unknown` or `disconnected`, as the manager sees node `index`."""
        attrs = self.swarm_nodes().get(self.node(index).node_id)
        return str(attrs["Status"]["State"]) if attrs else "missing"

    def wait_node_status(self, index: int, status: str, timeout: float = 60.0) -> None:
        """Wait until the manager reports node `index` in `status` (e.g. `down`, `ready`)."""
        node = self.node(index)
        wait_until(
            lambda: self.node_status(index) == status,
            timeout=timeout,
            what=f"{node.name} ({node.node_id}) to be {status}",
            detail=lambda: self.log_tails([self.manager, node] if node.index > 1 else [node]),
        )

    def wait_nodes_ready(self, timeout: float | None = None) -> None:
        """Wait until every node is a member and `ready` in the manager's view."""
        expected = {node.node_id for node in self.nodes}

        def ready() -> bool:
            nodes = self.swarm_nodes()
            return all(
                nid in nodes and nodes[nid]["Status"]["State"] == "ready" for nid in expected
            )

        wait_until(
            ready,
            timeout=timeout or self.start_timeout,
            what=f"{len(expected)} nodes ready",
            detail=self.log_tails,
        )

    # ---- faults

    def stop_node(self, index: int, *, kill: bool = False, timeout: float | None = None) -> None:
        """Take node `index` away.

        `kill=False`: SIGTERM to its dockerd (it stops its containers and its
        containerd), SIGKILL after `timeout` (default `stop_timeout`).
        `kill=True`: SIGKILL to every process of the node at once (dockerd,
        containerd, shims, containers) — a power cut. Either way nothing of
        the node runs afterwards; its namespace, data and swarm identity stay,
        so `start_node` brings the same node back. The manager notices after
        a few heartbeats (`wait_node_status(index, "down")`). Stopping the
        only manager leaves the swarm without a control plane.
        """
        node = self.node(index)
        if node.process is not None and node.running and not kill:
            node.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=self.stop_timeout if timeout is None else timeout)
        survivors = _kill_and_wait([f"{node.directory}/"], [node.netns])
        if node.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=10)
        if survivors or node.running:
            raise SwarmError(f"{node.name}: processes {sorted(survivors)} survived SIGKILL")

    def start_node(
        self, index: int, *, wait_ready: bool = True, timeout: float | None = None
    ) -> None:
        """Start node `index`'s dockerd again (same data, same swarm membership).

        With `wait_ready`, also wait until a running manager (possibly this
        node itself) reports it `ready`; skipped when no manager runs.
        """
        node = self.node(index)
        self._launch(node)
        self._wait_daemon(node, timeout or self.start_timeout)
        if (
            wait_ready
            and self.form_swarm
            and any(n.role == "manager" and n.running for n in self.nodes)
        ):
            self.wait_node_status(index, "ready", timeout or self.start_timeout)

    # ---- teardown

    def close(self, *, raise_on_leftovers: bool = True) -> None:
        """Tear everything of the run down (idempotent); SwarmError if something stays."""
        if self._closed:
            return
        self._closed = True
        with _deferred_sigint():
            self._stop_all_gracefully()
            leftovers = _teardown_run(self.run_dir, self.netns_names)
        if leftovers and raise_on_leftovers:
            raise SwarmError("swarm teardown left: " + "; ".join(leftovers))

    def _stop_all_gracefully(self) -> None:
        running = [node for node in self.nodes if node.running]
        for node in running:
            assert node.process is not None
            node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for node in running:
            assert node.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def leftovers(self) -> list[str]:
        """What of this run still exists (processes, mounts, namespaces, files); empty when gone."""
        return _leftovers(self.run_dir, self.netns_names)

    # ---- stale runs

    @staticmethod
    def cleanup_stale(prefix: str = DEFAULT_PREFIX, root: Path = DEFAULT_ROOT) -> list[str]:
        """Tear down every run under `prefix`/`root` whose owner process is gone.

        Returns the run ids removed. Runs of live owners (another test, a
        soak in progress) are left alone.
        """
        runs: dict[str, list[str]] = {}
        for name in _netns_list():
            run_id, _, suffix = name.removeprefix(f"{prefix}-").partition("-")
            if name.startswith(f"{prefix}-") and run_id and suffix:
                runs.setdefault(run_id, []).append(name)
        if root.is_dir():
            for entry in root.iterdir():
                if entry.is_dir():
                    runs.setdefault(entry.name, [])
        removed = []
        for run_id, namespaces in sorted(runs.items()):
            run_dir = root / run_id
            if _owner_alive(run_dir):
                continue
            _teardown_run(run_dir, namespaces)
            removed.append(run_id)
        return removed


def run_leftovers(
    run_id: str, prefix: str = DEFAULT_PREFIX, root: Path = DEFAULT_ROOT
) -> list[str]:
    """What of run `run_id` still exists (for tests of `cleanup_stale`); empty when gone."""
    namespaces = [name for name in _netns_list() if name.startswith(f"{prefix}-{run_id}-")]
    return _leftovers(root / run_id, namespaces)


def _teardown_run(run_dir: Path, namespaces: list[str]) -> list[str]:
    """Kill, unmount, delete namespaces and files of one run; returns what is left."""
    marker = f"{run_dir}/"
    _kill_and_wait([marker], namespaces)
    _unmount_under(run_dir)
    _delete_netns(namespaces)
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    return _leftovers(run_dir, namespaces)


def _leftovers(run_dir: Path, namespaces: list[str]) -> list[str]:
    found = []
    pids = _processes_of([f"{run_dir}/"], namespaces)
    if pids:
        found.append(f"processes {sorted(pids)}")
    mounts = _mounts_under(run_dir)
    if mounts:
        found.append(f"mounts {mounts}")
    present = sorted(set(namespaces) & set(_netns_list()))
    if present:
        found.append(f"network namespaces {present}")
    if run_dir.exists():
        found.append(f"directory {run_dir}")
    return found


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[None]:
    """Hold back Ctrl-C while set-up bookkeeping or teardown runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.swarm", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up", help="start a swarm, print its nodes as JSON, tear down on Ctrl-C/SIGTERM"
    )
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--managers", type=int, default=1)
    up.add_argument("--log-dir", type=Path)
    up.add_argument("--images", nargs="*", default=list(DEFAULT_IMAGES))
    up.add_argument(
        "--no-swarm", action="store_true", help="only start the daemons (no swarm init/join)"
    )
    cleanup = sub.add_parser("cleanup", help="remove runs whose owner process is gone")
    for command in (up, cleanup):
        command.add_argument("--prefix", default=DEFAULT_PREFIX, help="of namespace names")
        command.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="of run directories")
    args = parser.parse_args(argv)

    if args.command == "cleanup":
        removed = SwarmCluster.cleanup_stale(prefix=args.prefix, root=args.root)
        print(json.dumps({"removed": removed}))
        return 0

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        with SwarmCluster(
            args.nodes,
            managers=args.managers,
            images=args.images,
            log_dir=args.log_dir,
            swarm=not args.no_swarm,
            prefix=args.prefix,
            root=args.root,
        ) as cluster:
            print(
                json.dumps(
                    {
                        "run_id": cluster.run_id,
                        "manager_url": cluster.manager_url,
                        "nodes": [node.describe() for node in cluster.nodes],
                    }
                ),
                flush=True,
            )
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
