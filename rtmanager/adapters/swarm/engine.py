"""The Docker Swarm engine backend: the `EngineBackend` port on a swarm manager (SPEC §10).

Each game's workload is a replicated service `galaxy-game-{game_id}`; its
one task's container is the engine. The manager is the only endpoint: it
knows every service, task and node, but a container on another node cannot
be inspected, stopped or read from there, so everything here is said in
services and tasks.

- `create` makes the service with **0 replicas** (the port's "create, not
  start"); `start` scales it to 1 and waits, within the start timeout cut
  by the caller's deadline, for the task to run, and returns its
  container's id.
- Ids: the service's id, its name, or the container id of one of its tasks
  (64 hex digits) all name the workload. A container id is looked up among
  the tasks, and, once the swarm has dropped a stopped task, through the
  service label `LAST_CONTAINER` that `stop` writes, so a stopped game's
  record keeps naming its workload.
- A task counts as running only when its reported state is `running`, its
  desired state is `running` and its node is not `down`: a node that went
  away leaves its task reported `running` with desired state `shutdown`.
- `stop` scales to 0 (the task gets SIGTERM, then SIGKILL after the stop
  grace period fixed at `create`) and waits for the task to end.
- Health: a task of an image with a health check stays `starting` until
  the check passes (and fails when it fails), so a running task is a
  healthy one; the swarm does not report the check itself, and `inspect`
  gives `health=None`.
- State lives in a named volume per game, `galaxy-state-{game_id}`, created
  by the node that runs the task (`host_state_dirs=False`); a `local`
  volume stays on that node.
- Events: container events exist only on the node that runs the container,
  and the manager's event stream has no task events, so `follow_events`
  polls the tasks (`SwarmTaskEventStream`) and reports a task that stopped
  running as `die`.

Errors follow the single-host adapter's policy (`docker_call`). Beside the
adapter: `services.py` says what a game's service is made of, and
`tasks.py` judges tasks and holds the polling event stream.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, cast

import docker
import docker.errors
from docker.types import ServiceMode

from rtmanager.adapters.docker.calls import (
    DEFAULT_PROBE_TIMEOUT,
    DockerConnection,
    docker_call,
    explain,
    owner_filters,
    status_code,
    whole_seconds,
)
from rtmanager.adapters.swarm.services import service_create_args
from rtmanager.adapters.swarm.tasks import (
    TERMINAL_STATES,
    SwarmTaskEventStream,
    TaskView,
    current_task,
    task_container_id,
    task_view,
)
from rtmanager.deadlines import bounded, cut_by_deadline
from rtmanager.domain import labels as galaxy_labels
from rtmanager.domain.errors import (
    Conflict,
    ContainerStartFailed,
    ImagePullFailed,
    InternalError,
    ServiceUnavailable,
)
from rtmanager.ports import (
    BackendCapabilities,
    BackendMismatch,
    ContainerInfo,
    ContainerSpec,
    EventStream,
    PullPolicy,
)

__all__ = ["LAST_CONTAINER", "SwarmEngineAdapter"]


# The service label naming the container its task ran, written by `stop`.
LAST_CONTAINER = "com.galaxy.rtmanager.last_container"

_CAPABILITIES = BackendCapabilities(host_state_dirs=False)
_CONTAINER_ID = re.compile(r"^[0-9a-f]{64}$")
_POLL_SECONDS = 0.2
# How long `stop` waits beyond the grace period for the swarm to report the end.
_STOP_MARGIN_SECONDS = 15.0
# Swarm refuses an update made from an outdated service version; retried.
_UPDATE_ATTEMPTS = 5


class _SwarmApi(Protocol):
    """The slice of docker-py's `APIClient` used here, typed (its stubs leave most untyped)."""

    def info(self) -> dict[str, Any]: ...
    def inspect_image(self, image: str) -> dict[str, Any]: ...
    def networks(self, names: list[str] | None = None) -> list[dict[str, Any]]: ...
    def create_network(self, name: str, **kwargs: Any) -> dict[str, Any]: ...
    def create_service(self, task_template: Any, **kwargs: Any) -> dict[str, Any]: ...
    def update_service(self, service: str, version: int, **kwargs: Any) -> Any: ...
    def inspect_service(self, service: str) -> dict[str, Any]: ...
    def remove_service(self, service: str) -> Any: ...
    def services(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...
    def tasks(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...
    def nodes(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...
    def inspect_node(self, node_id: str) -> dict[str, Any]: ...
    def service_logs(self, service: str, **kwargs: Any) -> Iterable[bytes]: ...


class SwarmEngineAdapter:
    """The `EngineBackend` port on a Docker Swarm manager, through docker-py.

    Thread-safe; the client is built on first use, as in the single-host adapter.
    """

    def __init__(
        self,
        *,
        base_url: str,
        cluster: str,
        constraints: Iterable[str] = (),
        volume_driver: str = "local",
        stop_grace: timedelta = timedelta(seconds=10),
        start_wait: timedelta = timedelta(seconds=30),
        timeout: timedelta = timedelta(seconds=30),
        poll_interval: timedelta = timedelta(seconds=1),
        probe_timeout: timedelta = DEFAULT_PROBE_TIMEOUT,
    ) -> None:
        """Prepare an adapter for the manager at `base_url` and deployment `cluster`.

        `stop_grace` is each service's stop grace period (swarm fixes it
        when the service is made); `start_wait` bounds `start`'s wait for
        the task, cut by the caller's deadline; `poll_interval` paces
        `follow_events`; `timeout` bounds each Docker call, and `ping` waits
        at most `probe_timeout` (no longer than `timeout`) for its answer.
        """
        self._base_url = base_url
        self._cluster = cluster
        self._constraints = [c.strip() for c in constraints if c.strip()]
        self._volume_driver = volume_driver
        self._stop_grace = stop_grace
        self._start_wait = start_wait
        self._poll_seconds = poll_interval.total_seconds()
        self._connection = DockerConnection(base_url, whole_seconds(timeout))
        self._probe_connection = self._connection.for_probes(probe_timeout)
        self._owned_lock = threading.Lock()
        self._owned_ids: set[str] = set()
        # Container id -> service id, as seen in tasks.
        self._services_of: dict[str, str] = {}
        self._hostnames: dict[str, str] = {}

    @property
    def cluster(self) -> str:
        """The deployment whose services this adapter owns."""
        return self._cluster

    def close(self) -> None:
        """Release the clients' connections; a later call builds a new client."""
        self._connection.close()
        self._probe_connection.close()

    def _api(self) -> _SwarmApi:
        return cast("_SwarmApi", self._connection.client().api)

    # -- EngineBackend ----------------------------------------------------

    @property
    def capabilities(self) -> BackendCapabilities:
        """State lives in named volumes the nodes create; no host directories."""
        return _CAPABILITIES

    def ping(self) -> None:
        """Raise `ServiceUnavailable` unless the endpoint is a reachable swarm manager.

        A daemon that answers but is no manager (not in a swarm, a worker, a
        locked swarm) raises `BackendMismatch`. The answer is awaited for
        `probe_timeout` at most, on a client of its own.
        """
        try:
            with docker_call("info"):
                info = self._probe_connection.client().api.info()
        except InternalError as exc:
            raise ServiceUnavailable(exc.message) from exc
        swarm = info.get("Swarm") or {}
        state = str(swarm.get("LocalNodeState") or "inactive")
        if state != "active" or not swarm.get("ControlAvailable"):
            raise BackendMismatch(
                f"docker endpoint {self._base_url} is not a swarm manager "
                f"(swarm state {state!r}, manager: {bool(swarm.get('ControlAvailable'))}); "
                "RTMANAGER_BACKEND=swarm needs a manager's endpoint"
            )

    def ensure_image(self, image_ref: str, policy: PullPolicy) -> None:
        """Check the image per `policy`: nodes pull for themselves when they run a task.

        `NEVER`: the image must be present on the manager (nodes are
        expected to hold it too; a node without it fails the task, which
        `start` reports). `IF_MISSING` and `ALWAYS`: nothing here; the node
        that gets the task pulls, and a failed pull fails the start.
        """
        if policy is not PullPolicy.NEVER:
            return
        with docker_call(f"inspect image {image_ref}"):
            try:
                self._api().inspect_image(image_ref)
            except docker.errors.NotFound as exc:
                raise ImagePullFailed(
                    f"image {image_ref} is not present on the swarm manager and the pull "
                    "policy is never",
                    metadata={"image_ref": image_ref},
                ) from exc
            except docker.errors.APIError as exc:
                if status_code(exc) == 400:
                    raise ImagePullFailed(
                        f"image {image_ref}: {explain(exc)}", metadata={"image_ref": image_ref}
                    ) from exc
                raise

    def ensure_network(self, name: str, labels: dict[str, str]) -> None:
        """Create the attachable, internal overlay network unless it exists.

        Network names are unique in a swarm (the manager refuses a second
        one), so concurrent creators settle on one: a refused create finds
        the other's. An existing network that is not a swarm overlay cannot
        carry services: `ContainerStartFailed`.
        """
        with docker_call(f"ensure network {name}"):
            api = self._api()
            for _ in range(3):
                found = [n for n in api.networks(names=[name]) or [] if n.get("Name") == name]
                if found:
                    if not any(n.get("Scope") == "swarm" for n in found):
                        raise ContainerStartFailed(
                            f"network {name} exists but is not a swarm overlay network"
                        )
                    return
                try:
                    api.create_network(
                        name,
                        driver="overlay",
                        attachable=True,
                        internal=True,
                        scope="swarm",
                        labels=dict(labels),
                        check_duplicate=True,
                    )
                    return
                except docker.errors.APIError as exc:
                    if status_code(exc) != 409:
                        raise
        raise ServiceUnavailable(f"docker: ensure network {name}: could not settle")

    def create(self, spec: ContainerSpec) -> str:
        """Create the game's service with 0 replicas; return the service's id."""
        args = service_create_args(
            spec,
            constraints=self._constraints,
            volume_driver=self._volume_driver,
            stop_grace=self._stop_grace,
            network=spec.network,
        )
        with docker_call(f"create service {spec.name}"):
            try:
                created = self._api().create_service(**args)
            except docker.errors.APIError as exc:
                if status_code(exc) == 409:
                    raise Conflict(
                        f"a service named {spec.name} already exists: {explain(exc)}"
                    ) from exc
                if 400 <= status_code(exc) < 500:
                    raise ContainerStartFailed(
                        f"docker refused service {spec.name}: {explain(exc)}"
                    ) from exc
                raise
        service_id = str(created.get("ID") or "")
        if not service_id:
            raise InternalError(f"docker created service {spec.name} without reporting its id")
        if galaxy_labels.is_owned(spec.labels, self._cluster):
            self._remember_owned(service_id)
        return service_id

    def start(self, workload_id: str) -> str:
        """Scale the service to 1 and return its task's container id once it runs.

        Waits for the task to be scheduled and running, within the start
        timeout cut by the caller's deadline. A task that fails (or is
        rejected, e.g. for a missing image) is `ContainerStartFailed` with
        the task's error and log tail.
        """
        service = self._service(workload_id)
        if service is None:
            raise ContainerStartFailed(f"service {workload_id} does not exist")
        service_id = str(service["ID"])
        self._scale(service_id, 1)
        wait = bounded(self._start_wait)
        deadline = time.monotonic() + wait.total_seconds()
        view: TaskView | None = None
        while True:
            with docker_call(f"tasks of service {service_id}"):
                task = current_task(self._tasks_of(service_id))
            if task is not None:
                view = task_view(task, self._node_state(str(task.get("NodeID") or "")))
                if view.container_id:
                    self._services_of[view.container_id] = service_id
                if view.running and view.container_id:
                    self._remember_owned(view.container_id)
                    return view.container_id
                if str((task.get("Status") or {}).get("State")) in TERMINAL_STATES:
                    self._start_failed(service_id, view)
            if time.monotonic() >= deadline:
                if cut_by_deadline(self._start_wait):
                    raise ServiceUnavailable(
                        "the caller's deadline passed while the engine task was starting"
                    )
                state = f"{view.state}: {view.error}" if view is not None else "no task yet"
                raise ContainerStartFailed(
                    f"the engine task of service {service_id} did not run within "
                    f"{wait.total_seconds():g}s ({state}){self._tail_note(service_id)}"
                )
            time.sleep(_POLL_SECONDS)

    def _start_failed(self, service_id: str, view: TaskView) -> None:
        message = (
            f"the engine task ended {view.state}"
            + (f" with code {view.exit_code}" if view.exit_code is not None else "")
            + (f": {view.error}" if view.error else "")
            + self._tail_note(service_id)
        )
        if "No such image" in view.error or "pull" in view.error.lower():
            raise ImagePullFailed(message)
        raise ContainerStartFailed(message)

    def _tail_note(self, service_id: str) -> str:
        try:
            tail = self.logs_tail(service_id, 20).strip()
        except ServiceUnavailable:
            return ""
        return f"; last output:\n{tail}" if tail else ""

    def stop(self, container_id: str, timeout: timedelta) -> None:
        """Scale to 0 (SIGTERM, SIGKILL after the grace period) and wait for the task to end.

        The grace period is the service's, fixed at `create` from the
        stop timeout; `timeout` bounds the wait. One already gone is fine.
        """
        found = self._locate(container_id)
        if found is None:
            return
        service, task = found
        service_id = str(service["ID"])
        running_container = task_container_id(task) if task is not None else ""
        extra = {LAST_CONTAINER: running_container} if running_container else {}
        self._scale(service_id, 0, extra_labels=extra)
        give_up = time.monotonic() + timeout.total_seconds() + _STOP_MARGIN_SECONDS
        while True:
            with docker_call(f"tasks of service {service_id}"):
                tasks = self._tasks_of(service_id)
            live = [
                t
                for t in tasks
                if str((t.get("Status") or {}).get("State")) not in TERMINAL_STATES
                and self._node_state(str(t.get("NodeID") or "")) != "down"
            ]
            if not live:
                return
            if time.monotonic() >= give_up:
                raise ServiceUnavailable(
                    f"docker: the task of service {service_id} did not stop in time"
                )
            time.sleep(_POLL_SECONDS)

    def remove(self, container_id: str, *, force: bool = False) -> None:
        """Remove the service the id names (not its volume); one already gone is fine."""
        found = self._locate(container_id)
        if found is None:
            return
        service, task = found
        service_id = str(service["ID"])
        if not force and task is not None:
            node = self._node_state(str(task.get("NodeID") or ""))
            if task_view(task, node).running:
                raise Conflict(f"cannot remove service {service_id}: its engine is running")
        with (
            docker_call(f"remove service {service_id}"),
            contextlib.suppress(docker.errors.NotFound),
        ):
            self._api().remove_service(service_id)
        with self._owned_lock:
            self._owned_ids.discard(service_id)
            self._owned_ids.discard(container_id)

    def inspect(self, id_or_name: str) -> ContainerInfo | None:
        """Report the task (and node) of the service the id names; None if there is none."""
        found = self._locate(id_or_name)
        if found is None:
            return None
        service, task = found
        info = self._to_info(service, task, full=True)
        if info.owned:
            self._remember_owned(info.id, str(service["ID"]))
        return info

    def owns(self, container_id: str) -> bool | None:
        """Whether the id's workload is this deployment's (None when there is none)."""
        with self._owned_lock:
            if container_id in self._owned_ids:
                return True
        info = self.inspect(container_id)
        return None if info is None else info.owned

    def list_owned(self) -> list[ContainerInfo]:
        """One entry per owned service: its current task's container, running or not."""
        services, tasks = self._owned_services_and_tasks()
        nodes = self._node_states() if services else {}
        infos = []
        for service in services:
            task = current_task(tasks.get(str(service["ID"]), []))
            infos.append(self._to_info(service, task, full=False, nodes=nodes))
        with self._owned_lock:
            self._owned_ids = {i.id for i in infos} | {str(s["ID"]) for s in services}
        return infos

    def logs_tail(self, container_id: str, lines: int = 20) -> str:
        """The last lines of the service's output ("" when unavailable)."""
        if lines <= 0:
            return ""
        found = self._locate(container_id)
        if found is None:
            return ""
        service_id = str(found[0]["ID"])
        chunks: list[bytes] = []
        with docker_call(f"logs of service {service_id}"):
            try:
                for chunk in self._api().service_logs(
                    service_id, stdout=True, stderr=True, tail=lines, is_tty=False
                ):
                    chunks.append(chunk if isinstance(chunk, bytes) else str(chunk).encode())
            except docker.errors.APIError as exc:
                if status_code(exc) >= 500 and status_code(exc) != 501:
                    raise
                return ""
        return b"".join(chunks).decode("utf-8", errors="replace")

    def follow_events(self, since: datetime | None = None) -> EventStream:
        """Poll the owned services' tasks for engines starting and ending (see the stream).

        `since` is not replayed: a (re)connected listener reconciles, which
        covers what happened before the first poll.
        """
        first = self.task_snapshot()
        return SwarmTaskEventStream(self, first, self._poll_seconds)

    def task_snapshot(self) -> dict[str, tuple[str, bool, int | None]]:
        """Container id -> (game id, running, exit code) of every owned service's tasks."""
        services, tasks = self._owned_services_and_tasks()
        snapshot: dict[str, tuple[str, bool, int | None]] = {}
        nodes = self._node_states()
        for service in services:
            labels = _labels(service)
            game_id = labels.get(galaxy_labels.GAME_ID, "")
            for task in tasks.get(str(service["ID"]), []):
                view = task_view(task, nodes.get(str(task.get("NodeID") or "")))
                if view.container_id:
                    snapshot[view.container_id] = (game_id, view.running, view.exit_code)
        return snapshot

    # -- plumbing ---------------------------------------------------------

    def _remember_owned(self, *ids: str) -> None:
        with self._owned_lock:
            self._owned_ids.update(i for i in ids if i)

    def _service(self, key: str) -> dict[str, Any] | None:
        with docker_call(f"inspect service {key}"):
            try:
                return self._api().inspect_service(key)
            except docker.errors.NotFound:
                return None

    def _locate(self, key: str) -> tuple[dict[str, Any], Mapping[str, Any] | None] | None:
        """The service an id or name names, and the task that stands for it."""
        api = self._api()
        if _CONTAINER_ID.fullmatch(key):
            with docker_call(f"find the task of container {key}"):
                known = self._services_of.get(key)
                tasks: list[dict[str, Any]] = []
                if known:
                    tasks = self._tasks_of(known)
                task = next((t for t in tasks if task_container_id(t) == key), None)
                if task is None:
                    task = next((t for t in api.tasks() if task_container_id(t) == key), None)
                if task is not None:
                    service = self._service(str(task.get("ServiceID") or ""))
                    if service is None:
                        return None
                    self._services_of[key] = str(service["ID"])
                    return service, task
                # The swarm may have dropped a stopped task; `stop` labelled its service.
                labelled = api.services(filters={"label": f"{LAST_CONTAINER}={key}"})
            if not labelled:
                return None
            service = self._service(str(labelled[0]["ID"]))
            return (service, None) if service is not None else None
        if not key:
            return None
        service = self._service(key)
        if service is None or (service.get("Spec", {}).get("Name") != key and service["ID"] != key):
            # docker resolves id prefixes too; only whole ids and names count.
            return None
        with docker_call(f"tasks of service {key}"):
            newest = current_task(self._tasks_of(str(service["ID"])))
        return service, newest

    def _tasks_of(self, *service_ids: str) -> list[dict[str, Any]]:
        """The tasks of these services; a service removed meanwhile has none.

        Swarm answers 404 for the whole listing when one of the services is
        gone, so then each is asked on its own.
        """
        api = self._api()
        try:
            return list(api.tasks(filters={"service": list(service_ids)}))
        except docker.errors.NotFound:
            if len(service_ids) == 1:
                return []
        return [task for one in service_ids for task in self._tasks_of(one)]

    def _scale(
        self, service_id: str, replicas: int, *, extra_labels: Mapping[str, str] | None = None
    ) -> None:
        for attempt in range(_UPDATE_ATTEMPTS):
            service = self._service(service_id)
            if service is None:
                raise ContainerStartFailed(f"service {service_id} vanished")
            spec = service.get("Spec") or {}
            labels = dict(spec.get("Labels") or {})
            labels.update(extra_labels or {})
            with docker_call(f"scale service {service_id}"):
                try:
                    self._api().update_service(
                        service_id,
                        version=int(service["Version"]["Index"]),
                        task_template=spec.get("TaskTemplate"),
                        name=spec.get("Name"),
                        labels=labels,
                        mode=ServiceMode("replicated", replicas=replicas),
                        networks=spec.get("TaskTemplate", {}).get("Networks"),
                        endpoint_spec=spec.get("EndpointSpec"),
                    )
                    return
                except docker.errors.APIError as exc:
                    if "out of sequence" in explain(exc) and attempt < _UPDATE_ATTEMPTS - 1:
                        continue
                    if status_code(exc) == 404:
                        raise ContainerStartFailed(f"service {service_id} vanished") from exc
                    raise

    def _node_states(self) -> dict[str, str]:
        with docker_call("list nodes"):
            nodes = self._api().nodes()
        states = {}
        for node in nodes or []:
            node_id = str(node.get("ID") or "")
            hostname = str((node.get("Description") or {}).get("Hostname") or "")
            if hostname:
                self._hostnames[node_id] = hostname
            states[node_id] = str((node.get("Status") or {}).get("State") or "")
        return states

    def _node_state(self, node_id: str) -> str | None:
        if not node_id:
            return None
        with docker_call(f"inspect node {node_id}"):
            try:
                node = self._api().inspect_node(node_id)
            except docker.errors.NotFound:
                return "down"
        hostname = str((node.get("Description") or {}).get("Hostname") or "")
        if hostname:
            self._hostnames[node_id] = hostname
        return str((node.get("Status") or {}).get("State") or "")

    def _owned_services_and_tasks(
        self,
    ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        api = self._api()
        with docker_call("list services"):
            listed = api.services(filters={"label": owner_filters(self._cluster)}) or []
            services = [s for s in listed if galaxy_labels.is_owned(_labels(s), self._cluster)]
            tasks: dict[str, list[dict[str, Any]]] = {}
            if services:
                for task in self._tasks_of(*(str(s["ID"]) for s in services)):
                    tasks.setdefault(str(task.get("ServiceID") or ""), []).append(task)
        return services, tasks

    def _to_info(
        self,
        service: Mapping[str, Any],
        task: Mapping[str, Any] | None,
        *,
        full: bool,
        nodes: Mapping[str, str] | None = None,
    ) -> ContainerInfo:
        labels = _labels(service)
        spec = service.get("Spec") or {}
        name = str(spec.get("Name") or "")
        owned = galaxy_labels.is_owned(labels, self._cluster)
        image = str(
            ((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image") or ""
        )
        image_ref = labels.get(galaxy_labels.IMAGE_REF) or image
        if task is None:
            # Never started, or stopped and its task dropped by the swarm.
            return ContainerInfo(
                id=labels.get(LAST_CONTAINER) or str(service["ID"]),
                name=name,
                state="created" if not labels.get(LAST_CONTAINER) else "shutdown",
                running=False,
                owned=owned,
                labels=labels,
                image_ref=image_ref,
                game_id=labels.get(galaxy_labels.GAME_ID, ""),
            )
        node_id = str(task.get("NodeID") or "")
        node_state = nodes.get(node_id) if nodes is not None else self._node_state(node_id)
        view = task_view(task, node_state)
        if view.container_id:
            self._services_of[view.container_id] = str(service["ID"])
        return ContainerInfo(
            id=view.container_id or labels.get(LAST_CONTAINER) or str(service["ID"]),
            name=name,
            state=view.state,
            running=view.running,
            owned=owned,
            labels=labels,
            image_ref=image_ref,
            game_id=labels.get(galaxy_labels.GAME_ID, ""),
            exit_code=view.exit_code if full else None,
            started_at=view.started_at if full else None,
            finished_at=view.finished_at if full else None,
            image_id=image if image.startswith("sha256:") or "@sha256:" in image else "",
            node_id=node_id,
            node_hostname=self._hostnames.get(node_id, ""),
        )


def _labels(service: Mapping[str, Any]) -> dict[str, str]:
    return dict((service.get("Spec") or {}).get("Labels") or {})


if TYPE_CHECKING:
    from rtmanager.ports import EngineBackend

    def _implements_port(adapter: SwarmEngineAdapter) -> EngineBackend:
        # mypy proves here that the adapter satisfies the port's protocol.
        return adapter
