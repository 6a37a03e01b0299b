"""What both Docker backends share: one docker-py client per endpoint and one
translation of docker-py's failures into the service's errors.

Error policy, in one place (`docker_call`):

- the daemon not answering — connection refused, missing socket, read
  timeouts, a broken stream, docker-py failing to negotiate the API version,
  or a 5xx error that no method expects — is `ServiceUnavailable`;
- the 4xx answers a method expects (404 of a vanished container, 409 of a
  name conflict, ...) are handled by that method as its port docstring says;
- any other 4xx is a bug in how we call Docker: `InternalError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions

from rtmanager.domain import labels as galaxy_labels
from rtmanager.domain.errors import InternalError, ServiceUnavailable

logger = logging.getLogger(__name__)


# Docker reports "never" as the zero time of Go.
GO_ZERO_TIME_PREFIX = "0001-01-01"


# What a broken or absent daemon looks like from docker-py's side. APIError
# subclasses requests' HTTPError, so it must be matched before these.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    docker.errors.StreamParseError,
    OSError,
)


def explain(exc: BaseException) -> str:
    """Return the daemon's own words for an APIError, else the exception text."""
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


def status_code(exc: docker.errors.APIError) -> int:
    return exc.status_code or 0


@contextlib.contextmanager
def docker_call(what: str) -> Iterator[None]:
    """Translate docker-py failures not handled inside the block.

    Errors of the service's own vocabulary raised in the block pass through.
    """
    try:
        yield
    except docker.errors.APIError as exc:
        if status_code(exc) >= 500:
            raise ServiceUnavailable(f"docker: {what}: daemon error: {explain(exc)}") from exc
        raise InternalError(f"docker: {what}: unexpected answer: {explain(exc)}") from exc
    except TRANSPORT_ERRORS as exc:
        raise ServiceUnavailable(f"docker: {what}: daemon unreachable: {explain(exc)}") from exc
    except docker.errors.DockerException as exc:
        # e.g. "Error while fetching server API version" from a lazy client.
        raise ServiceUnavailable(f"docker: {what}: {explain(exc)}") from exc


def parse_docker_time(value: object) -> datetime | None:
    """Parse Docker's RFC 3339 (nanosecond) timestamps to aware UTC datetimes.

    Go's zero time ("0001-01-01T00:00:00Z"), empty or malformed values mean
    "never" and give None.
    """
    if not isinstance(value, str) or not value or value.startswith(GO_ZERO_TIME_PREFIX):
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # fromisoformat takes at most microseconds: cut nanoseconds down to six digits.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        text = f"{head}.{(digits + '000000')[:6]}{rest}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        logger.warning("unparseable docker timestamp %r", value)
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def int_or_none(value: object) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def owner_filters(cluster: str) -> list[str]:
    """Daemon-side label filters narrowing to this deployment's containers.

    The cluster label can be filtered on only when it is not the default
    cluster, because a container without the label belongs to the default
    one; `is_owned` stays the final judge either way.
    """
    selectors = [f"{galaxy_labels.OWNER}={galaxy_labels.OWNER_VALUE}"]
    if cluster != galaxy_labels.DEFAULT_CLUSTER:
        selectors.append(f"{galaxy_labels.CLUSTER}={cluster}")
    return selectors


# How long a backend's `ping` waits for each answer unless told
# (RTMANAGER_DOCKER_PROBE_TIMEOUT): ample for a ping, a listing of one
# network or a swarm's `/info`, and far below the lifecycle calls' timeout,
# so that with a health check every 2 s a daemon that stops answering turns
# health NOT_SERVING within about 5 s and never holds the checker for long.
DEFAULT_PROBE_TIMEOUT = timedelta(seconds=3)


def whole_seconds(timeout: timedelta) -> int:
    """A positive timeout in the whole seconds docker-py takes, rounded up."""
    if timeout <= timedelta(0):
        raise ValueError("docker timeouts must be positive")
    return max(1, math.ceil(timeout.total_seconds()))


class DockerConnection:
    """One docker-py client of an endpoint, built on first use and rebuilt after `close`.

    Building it negotiates the API version (one request), so it is done
    once, not per call. Shared by the single-host and the swarm backends.
    """

    def __init__(self, base_url: str, timeout_seconds: int) -> None:
        self._base_url = base_url
        self._timeout_seconds = timeout_seconds
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    @property
    def timeout_seconds(self) -> int:
        """How long each call waits for its answer."""
        return self._timeout_seconds

    def for_probes(self, probe_timeout: timedelta) -> DockerConnection:
        """A connection of its own to the same endpoint for a backend's `ping`.

        Its calls wait `probe_timeout`, and never longer than this
        connection's: a health check must not wait as long as a lifecycle
        call may.
        """
        seconds = min(whole_seconds(probe_timeout), self._timeout_seconds)
        return DockerConnection(self._base_url, seconds)

    def client(self) -> docker.DockerClient:
        """The client, built now if there is none (`ServiceUnavailable` when that fails)."""
        with self._lock:
            if self._client is None:
                with docker_call("connect"):
                    client = docker.DockerClient(
                        base_url=self._base_url, timeout=self._timeout_seconds
                    )
                if self._base_url.startswith("unix://"):
                    # requests would look up proxies and .netrc credentials in
                    # the environment on every call; neither applies to a
                    # unix socket, and the look-ups cost about 0.3 ms a call.
                    client.api.trust_env = False
                self._client = client
            return self._client

    def close(self) -> None:
        """Release the client's connections; a later call builds a new client."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
