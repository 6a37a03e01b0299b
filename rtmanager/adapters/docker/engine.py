"""The single-host engine backend: the `EngineBackend` port on one Docker daemon, over docker-py.

Each game's workload is one container; `start` returns the id it was
given, containers report no node, and a game's state is a host directory
the service prepares (`host_state_dirs`).

Docker's failures become the service's errors in `rtmanager.adapters.docker.calls`
(`docker_call`), shared with the swarm backend. Beside the adapter:
`networks.py` settles on one engine network, `containers.py` says what an
engine container is made of, and `events.py` holds the event stream.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import docker
import docker.errors
import requests.exceptions

from rtmanager.adapters.docker.calls import (
    DEFAULT_PROBE_TIMEOUT,
    DockerConnection,
    docker_call,
    explain,
    int_or_none,
    owner_filters,
    parse_docker_time,
    status_code,
    whole_seconds,
)
from rtmanager.adapters.docker.containers import container_create_args
from rtmanager.adapters.docker.events import DockerEventStream
from rtmanager.adapters.docker.networks import (
    NETWORK_CROWDED_SECONDS,
    network_crowded,
    network_gone,
    settle_network,
)
from rtmanager.domain import labels as galaxy_labels
from rtmanager.domain.errors import (
    Conflict,
    ContainerStartFailed,
    EngineNetworkGone,
    ImagePullFailed,
    InternalError,
    ServiceUnavailable,
)
from rtmanager.ports import (
    BackendCapabilities,
    ContainerInfo,
    ContainerSpec,
    EventStream,
    PullPolicy,
)

__all__ = ["DockerEngineAdapter"]

logger = logging.getLogger(__name__)

# One host: state directories on it, prepared by the service.
_CAPABILITIES = BackendCapabilities(host_state_dirs=True)

# The container states (`State.Status`) in which Docker reports `State.Running`.
_RUNNING_STATES = frozenset({"running", "paused", "restarting"})


def _wedged(seconds: int) -> str:
    """The probe's complaint about a daemon that answers pings but no network listing."""
    return (
        f"Docker answers /_ping but not a network listing within {seconds} s: "
        "the daemon may be wedged (moby/moby#42545); see docs/operations.md, "
        "'A Docker daemon that stops answering lifecycle calls'"
    )


class DockerEngineAdapter:
    """The `EngineBackend` port on one Docker daemon, through docker-py.

    The docker-py client is built on first use: building it asks the daemon
    for its API version, and a daemon that is down at construction must not
    stop the service from starting (`ping` reports it instead). A failed
    build is retried on the next call.

    Thread-safe: the service's workers share one adapter.
    """

    def __init__(
        self,
        *,
        base_url: str,
        cluster: str,
        timeout: timedelta = timedelta(seconds=30),
        engine_network: str = "galaxy-engines",
        probe_timeout: timedelta = DEFAULT_PROBE_TIMEOUT,
    ) -> None:
        """Prepare an adapter for the daemon at `base_url` and deployment `cluster`.

        `timeout` bounds each Docker call; `ping` waits at most
        `probe_timeout` (no longer than `timeout`) for each of its answers,
        one of them a listing of `engine_network`.
        """
        self._cluster = cluster
        self._connection = DockerConnection(base_url, whole_seconds(timeout))
        self._probe_connection = self._connection.for_probes(probe_timeout)
        self._engine_network = engine_network
        self._network_lock = threading.Lock()
        # Engine network name -> the id `ensure_network` settled on; forgotten
        # when a create or start finds that network gone.
        self._network_ids: dict[str, str] = {}
        # Image references seen present; forgotten when a create finds one absent.
        self._present_images: set[str] = set()
        # Ids of containers seen owned (created, inspected or listed as ours),
        # so `owns` need not ask Docker again; see there.
        self._owned_lock = threading.Lock()
        self._owned_ids: set[str] = set()

    @property
    def cluster(self) -> str:
        """The deployment whose containers this adapter owns."""
        return self._cluster

    def close(self) -> None:
        """Release the clients' connections; a later call builds a new client."""
        self._connection.close()
        self._probe_connection.close()

    # -- plumbing ---------------------------------------------------------

    def _docker(self) -> docker.DockerClient:
        return self._connection.client()

    def _api(self) -> docker.APIClient:
        return self._docker().api

    # -- EngineBackend ----------------------------------------------------

    @property
    def capabilities(self) -> BackendCapabilities:
        """State lives in host directories the service prepares and bind-mounts."""
        return _CAPABILITIES

    def ping(self) -> None:
        """Raise `ServiceUnavailable` unless the daemon answers `/_ping` and a network listing.

        Docker 20.10 can deadlock in libnetwork (moby/moby#42545): container
        create, start and stop and every network listing then hang for good
        while `/_ping` is still answered. So the probe also lists the engine
        network by name, as `ensure_network` does; answered with or without
        that network, it passes. Both requests go through a client of their
        own that waits `probe_timeout` for each answer.
        """
        try:
            api = self._probe_connection.client().api
            with docker_call("ping"):
                api.ping()
            with docker_call(f"list networks named {self._engine_network}"):
                try:
                    api.networks(names=[self._engine_network])
                except requests.exceptions.ReadTimeout as exc:
                    raise ServiceUnavailable(
                        _wedged(self._probe_connection.timeout_seconds)
                    ) from exc
        except InternalError as exc:
            # Whatever answers there is not a usable Docker daemon.
            raise ServiceUnavailable(exc.message) from exc

    def ensure_image(self, image_ref: str, policy: PullPolicy) -> None:
        """Make the image present per `policy`; raise `ImagePullFailed` if not.

        `IF_MISSING` pulls only an absent image. `NEVER` never pulls and fails
        for an absent image. `ALWAYS` pulls every time and fails when the pull
        fails even if an older copy is present locally: the operator asked
        for the registry's current image, and silently running a stale one
        would hide a broken registry or a retagged image.

        Under `IF_MISSING` and `NEVER` an image seen present before is taken
        as present without asking Docker: `create` reports it absent if it
        was removed since (and forgets it), and the caller ensures it again.
        """
        if policy is not PullPolicy.ALWAYS and image_ref in self._present_images:
            return
        present = self._image_present(image_ref)
        if policy is PullPolicy.NEVER and not present:
            raise ImagePullFailed(f"image {image_ref} is not present and the pull policy is never")
        if policy is not PullPolicy.ALWAYS and present:
            self._present_images.add(image_ref)
            return
        self._pull(image_ref)
        if not self._image_present(image_ref):
            raise ImagePullFailed(f"image {image_ref} is still absent after pulling it")
        self._present_images.add(image_ref)

    def _image_present(self, image_ref: str) -> bool:
        with docker_call(f"inspect image {image_ref}"):
            try:
                self._docker().images.get(image_ref)
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                if status_code(exc) == 400:  # e.g. "invalid reference format"
                    raise ImagePullFailed(
                        f"image {image_ref}: {explain(exc)}", metadata={"image_ref": image_ref}
                    ) from exc
                raise
        return True

    def _pull(self, image_ref: str) -> None:
        logger.info("pulling image %s", image_ref)
        with docker_call(f"pull {image_ref}"):
            try:
                # docker-py splits repository, tag and digest itself.
                progress = self._api().pull(image_ref, stream=True, decode=True)
                # The daemon answers 200 and reports failures inside the stream.
                for message in progress:
                    if isinstance(message, dict) and message.get("error"):
                        detail = message.get("errorDetail") or {}
                        text = detail.get("message") or message["error"]
                        raise ImagePullFailed(
                            f"pull of {image_ref} failed: {text}",
                            metadata={"image_ref": image_ref},
                        )
            except docker.errors.APIError as exc:
                # Registry trouble (unreachable, unknown image, denied) comes
                # back as a 4xx/5xx of the daemon, which is up: not our outage.
                raise ImagePullFailed(
                    f"pull of {image_ref} failed: {explain(exc)}",
                    metadata={"image_ref": image_ref},
                ) from exc

    def ensure_network(self, name: str, labels: dict[str, str]) -> None:
        """Make sure exactly one network `name` exists (internal bridge, `labels`) and use it.

        An existing network of that name is used as it is. Docker does not
        enforce unique network names, and replicas (or processes) starting
        together may each find none and create one. They settle on one
        without a lock, by these rules (`settle_network`, in `networks.py`):

        - a network is used only when it was the only one of its name in a
          listing (its creator's own listing right after creating it, or
          listings over `_NETWORK_QUIET_SECONDS` for anyone else's, since
          its creator may still yield it and Docker removes a network on
          which containers are only created); engines are then created on it
          by id (`create`), so a duplicate appearing later never
          splits them;
        - a creator whose listing after its own create shows any other
          network of the name yields: it removes its own (no engine can be
          on it: it was never alone) and starts over;
        - while several are listed, everyone waits for the yielders.

        Why this cannot leave engines on two networks: Docker lists a network
        from the moment its create returns until it is removed. If creators A
        and B both kept theirs, each listed after its own create returned and
        saw only its own; say A listed first: B's network was not listed yet,
        so B's create returned after A's listing; B listed after that and A's
        network (never removed: A kept it) was listed, so B saw two and
        yielded. At most one creator keeps, then, and only yielders remove
        networks, right after creating them: a network seen alone for the
        quiet time was its creator's to keep (unless that creator stalled
        for longer between its create and its listing), so once one is used
        it stays. Creation time is no use for this: it is taken when a create
        starts, and a network can become visible after a younger one. If
        everyone yields, all start over after a random pause.

        Several networks that stay listed (left by an older rtmanager, say)
        are resolved by a deterministic keeper, the oldest (then the lowest
        id), the same on every replica; the others are removed when they
        carry `labels` and have no containers.

        The id settled on is remembered, and later calls ask Docker nothing:
        a network in use is never removed by a replica (see above), and
        one removed behind rtmanager's back is found out by the next `create`
        or `start` on it, which forgets it and raises `EngineNetworkGone`;
        the call after that settles again.
        """
        if name in self._network_ids:
            return
        with self._network_lock, docker_call(f"ensure network {name}"):
            # Another thread may have settled it while this one waited.
            if name not in self._network_ids:
                self._network_ids[name] = settle_network(self._api(), name, labels)

    def _forget_network(self, words: str) -> None:
        """Forget the remembered networks Docker's `words` name (all, if they name none).

        Without `_network_lock`, which a settling `ensure_network` may hold
        for a while: single dict operations are atomic.
        """
        named = [
            name
            for name, network_id in list(self._network_ids.items())
            if network_id in words or name in words
        ]
        for name in named or list(self._network_ids):
            self._network_ids.pop(name, None)

    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) the engine container of `spec` and return its id.

        Raises `Conflict` when the name is taken, `ImagePullFailed` when the
        image is not present (and forgets it was seen present),
        `EngineNetworkGone` when the remembered engine network was removed
        (on engines that check networks at create) and `ContainerStartFailed`
        when Docker refuses the container's configuration otherwise (e.g. a
        missing state dir).

        One request: the low-level create, without the inspect that docker-py's
        `containers.create` sends after it for a `Container` object.
        """
        with docker_call(f"create container {spec.name}"):
            api = self._api()
            # By the id `ensure_network` settled on, so that a network of the
            # same name appearing later cannot take engines elsewhere. (A dict
            # read needs no lock; `_network_lock` may be held for a while.)
            network = self._network_ids.get(spec.network, spec.network)
            try:
                created = api.create_container(**container_create_args(api, spec, network))
            except docker.errors.ImageNotFound as exc:
                self._present_images.discard(spec.image_ref)
                raise ImagePullFailed(
                    f"image {spec.image_ref} is not present: {explain(exc)}",
                    metadata={"image_ref": spec.image_ref},
                ) from exc
            except docker.errors.APIError as exc:
                if network_gone(exc):
                    self._forget_network(explain(exc))
                    raise EngineNetworkGone(
                        f"cannot create container {spec.name}: {explain(exc)}"
                    ) from exc
                if status_code(exc) == 409:
                    raise Conflict(
                        f"a container named {spec.name} already exists: {explain(exc)}"
                    ) from exc
                if 400 <= status_code(exc) < 500:
                    raise ContainerStartFailed(
                        f"docker refused container {spec.name}: {explain(exc)}"
                    ) from exc
                raise
        container_id = str(created.get("Id") or "")
        if not container_id:
            raise InternalError(f"docker created {spec.name} without reporting its id")
        if galaxy_labels.is_owned(spec.labels, self._cluster):
            self._remember_owned([container_id])
        return container_id

    def start(self, workload_id: str) -> str:
        """Start a created container and return its id; `ContainerStartFailed` if Docker refuses.

        Any error answer of the daemon (bad command, missing mount, vanished
        container, ...) is a start failure; only an unreachable daemon is
        `ServiceUnavailable`.

        Docker connects a starting container to its networks by name, so a
        network of the same name that a concurrent replica created, and is
        about to remove again (see `ensure_network`), makes the start fail
        as "ambiguous" (or, on an engine in swarm mode, which also asks the
        swarm for the name, as "could not attach ... not found" while that
        duplicate goes): that is retried for as long as such a duplicate may
        take to go. A network that is gone (removed behind rtmanager's back
        after `ensure_network` settled on it) is `EngineNetworkGone`.
        """
        give_up = time.monotonic() + NETWORK_CROWDED_SECONDS
        container_id = workload_id
        with docker_call(f"start container {container_id}"):
            while True:
                try:
                    self._api().start(container_id)
                    return container_id
                except docker.errors.APIError as exc:
                    if network_gone(exc):
                        self._forget_network(explain(exc))
                        raise EngineNetworkGone(
                            f"docker could not start container {container_id}: {explain(exc)}",
                            metadata={"container_id": container_id},
                        ) from exc
                    if network_crowded(exc) and time.monotonic() < give_up:
                        time.sleep(random.uniform(0.05, 0.25))
                        continue
                    raise ContainerStartFailed(
                        f"docker could not start container {container_id}: {explain(exc)}",
                        metadata={"container_id": container_id},
                    ) from exc

    def stop(self, container_id: str, timeout: timedelta) -> None:
        """Stop gracefully (SIGTERM), killing after `timeout`; a gone container is fine.

        docker-py extends the HTTP read timeout of the call by the stop
        timeout, so a slow engine does not look like a dead daemon.
        """
        seconds = max(0, math.ceil(timeout.total_seconds()))
        with docker_call(f"stop container {container_id}"):
            try:
                # 304 (already stopped) is not an error for requests/docker-py.
                self._api().stop(container_id, timeout=seconds)
            except docker.errors.NotFound:
                return

    def remove(self, container_id: str, *, force: bool = False) -> None:
        """Remove the container (killing it first when `force`); a gone one is fine.

        Raises `Conflict` when it still runs and `force` is not set.
        """
        with docker_call(f"remove container {container_id}"):
            try:
                self._api().remove_container(container_id, force=force)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                message = explain(exc)
                if status_code(exc) == 409 and "already in progress" in message:
                    return
                if status_code(exc) == 409:
                    raise Conflict(f"cannot remove container {container_id}: {message}") from exc
                raise
        with self._owned_lock:
            self._owned_ids.discard(container_id)

    def inspect(self, id_or_name: str) -> ContainerInfo | None:
        """Return what Docker says about a container, owned or not; None if absent.

        One host: the node is never reported (empty).
        """
        with docker_call(f"inspect container {id_or_name}"):
            try:
                data = cast("dict[str, Any]", self._api().inspect_container(id_or_name))
            except docker.errors.NotFound:
                return None
        info = self._to_info(data)
        if info.owned and info.id:
            self._remember_owned([info.id])
        return info

    def owns(self, container_id: str) -> bool | None:
        """Whether the container is this deployment's (None when Docker has none).

        Answered without a call for an id this adapter has seen owned: it
        created the container, or an inspect or listing showed it owned.
        Labels cannot change and ids are not reused, so that stays true; the
        container may have been removed since, which the stop or removal
        that follows takes as done. Any other id is inspected.
        """
        with self._owned_lock:
            if container_id in self._owned_ids:
                return True
        info = self.inspect(container_id)
        return None if info is None else info.owned

    def _remember_owned(self, container_ids: list[str], *, every_one: bool = False) -> None:
        """Add ids seen owned; `every_one` when they are all the owned containers there are.

        A complete listing replaces what is remembered, which forgets the
        containers removed behind the adapter's back.
        """
        with self._owned_lock:
            if every_one:
                self._owned_ids = set(container_ids)
            else:
                self._owned_ids.update(container_ids)

    def _to_info(self, data: dict[str, Any]) -> ContainerInfo:
        state: dict[str, Any] = data.get("State") or {}
        config: dict[str, Any] = data.get("Config") or {}
        labels: dict[str, str] = dict(config.get("Labels") or {})
        status = str(state.get("Status") or "")
        running = bool(state.get("Running"))
        health: dict[str, Any] = state.get("Health") or {}
        # A container that never ran ("created") has no exit code to report.
        exited = not running and status not in ("created", "")
        return ContainerInfo(
            id=str(data.get("Id", "")),
            name=str(data.get("Name", "")).lstrip("/"),
            state=status,
            running=running,
            owned=galaxy_labels.is_owned(labels, self._cluster),
            labels=labels,
            image_ref=labels.get(galaxy_labels.IMAGE_REF) or str(config.get("Image") or ""),
            game_id=labels.get(galaxy_labels.GAME_ID, ""),
            exit_code=int_or_none(state.get("ExitCode")) if exited else None,
            health=str(health["Status"]) if health.get("Status") else None,
            started_at=parse_docker_time(state.get("StartedAt")),
            finished_at=parse_docker_time(state.get("FinishedAt")),
            oom_killed=bool(state.get("OOMKilled")),
            restart_count=int_or_none(data.get("RestartCount")) or 0,
            image_id=str(data.get("Image") or ""),
        )

    def list_owned(self) -> list[ContainerInfo]:
        """Return every container of this deployment, running or not.

        One listing, narrowed by label on the daemon (owner, and the cluster
        unless it is the default one); `is_owned` has the last word. No
        container is inspected, so exit codes, health and times are None
        (see `_summary_to_info`).
        """
        with docker_call("list containers"):
            listed = cast(
                "list[dict[str, Any]]",
                self._api().containers(all=True, filters={"label": owner_filters(self._cluster)}),
            )
        infos = [info for info in map(self._summary_to_info, listed) if info.owned]
        self._remember_owned([info.id for info in infos if info.id], every_one=True)
        return infos

    def _summary_to_info(self, entry: dict[str, Any]) -> ContainerInfo:
        """A `ContainerInfo` from one entry of a listing (`GET /containers/json`).

        A listing's `State` is the `State.Status` an inspect reports, and
        Docker counts a paused or restarting container as running. It has
        no exit code, health, times, OOM flag or restart count (only some in
        the human `Status` text).
        """
        labels: dict[str, str] = dict(entry.get("Labels") or {})
        state = str(entry.get("State") or "")
        names = [str(n).lstrip("/") for n in entry.get("Names") or ()]
        # Links add names of the form "/linker/alias"; the container's own has no slash.
        name = next((n for n in names if "/" not in n), names[0] if names else "")
        return ContainerInfo(
            id=str(entry.get("Id", "")),
            name=name,
            state=state,
            running=state in _RUNNING_STATES,
            owned=galaxy_labels.is_owned(labels, self._cluster),
            labels=labels,
            image_ref=labels.get(galaxy_labels.IMAGE_REF) or str(entry.get("Image") or ""),
            game_id=labels.get(galaxy_labels.GAME_ID, ""),
            image_id=str(entry.get("ImageID") or ""),
        )

    def logs_tail(self, container_id: str, lines: int = 20) -> str:
        """Return the last `lines` lines of stdout and stderr ("" when unavailable)."""
        if lines <= 0:
            return ""
        with docker_call(f"logs of container {container_id}"):
            try:
                output = self._api().logs(
                    container_id, stdout=True, stderr=True, stream=False, tail=lines
                )
            except docker.errors.APIError as exc:
                if status_code(exc) >= 500 and status_code(exc) != 501:
                    raise
                # Gone (404) or a logging driver that cannot be read (501).
                return ""
        if isinstance(output, bytes):
            return output.decode("utf-8", errors="replace")
        return str(output)

    def follow_events(self, since: datetime | None = None) -> EventStream:
        """Stream events of this deployment's containers from `since` (or now) on.

        `since` is rounded down to the second, so a resumed stream may repeat
        an event or two; consumers are idempotent.
        """
        since_ts: int | None = None
        if since is not None:
            aware = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
            since_ts = math.floor(aware.timestamp())
        with docker_call("follow events"):
            stream = self._api().events(
                since=since_ts,
                decode=True,
                filters={"type": "container", "label": owner_filters(self._cluster)},
            )
        return DockerEventStream(stream, self._cluster)


if TYPE_CHECKING:
    from rtmanager.ports import EngineBackend

    def _implements_port(adapter: DockerEngineAdapter) -> EngineBackend:
        # mypy proves here that the adapter satisfies the port's protocol.
        return adapter
