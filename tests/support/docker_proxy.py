"""A unix socket in front of the Docker daemon's, for tests of a daemon that misbehaves.

    proxy = DockerSocketProxy(f"/tmp/gx-{test_id}.sock", upstream="/var/run/docker.sock")
    adapter = DockerEngineAdapter(base_url=proxy.url, ...)   # or RTMANAGER_DOCKER_HOST
    proxy.hold_network_listings()   # `GET /v*/networks...` is kept back, unanswered
    proxy.release()                 # ...and forwarded now; later ones pass again
    proxy.cut()                     # every connection dropped, as a daemon restart does
    proxy.close()

It forwards bytes both ways. Requests from the client are read one at a
time (request head, then the body its `Content-Length` announces), so a
hold applies to every request, also to the second one of a kept-alive
connection; after a chunked request or a connection upgrade the rest of
that connection is forwarded as it comes. A held request waits in the
proxy, not in the daemon: the daemon never sees it until `release`, which
is what a client of a daemon wedged in libnetwork (moby/moby#42545) sees.

With `upstream=None` it accepts connections and answers nothing at all.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Callable

# The request line of a network listing or of a network's inspect, versioned
# (as docker-py sends it) or not.
NETWORK_LISTING = re.compile(rb"GET /(?:v[0-9.]+/)?networks(?:[/? ]|$)")

_HEAD_END = b"\r\n\r\n"
_CHUNK = 65536


class DockerSocketProxy:
    """Forwards a unix socket to the daemon's; can hold network listings and drop connections.

    Everything it starts (its accept thread, two threads per connection)
    ends with `close()`, held requests included.
    """

    def __init__(self, path: str, *, upstream: str | None) -> None:
        self.path = path
        self._upstream = upstream
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._hold = threading.Condition(self._lock)
        self._holding = False
        self._held: list[str] = []
        self._waiting = 0
        self._stopped = threading.Event()
        self._accepter = threading.Thread(target=self._accept, name="docker-proxy", daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        """The `unix://` URL clients connect with."""
        return f"unix://{self.path}"

    @property
    def held(self) -> list[str]:
        """The request lines of every request held so far (released or not), in order."""
        with self._lock:
            return list(self._held)

    @property
    def waiting(self) -> int:
        """How many held requests wait for `release` now."""
        with self._lock:
            return self._waiting

    def hold_network_listings(self) -> None:
        """From now on, keep back every request whose request line is `GET /v*/networks...`."""
        with self._lock:
            self._holding = True

    def release(self) -> None:
        """Forward the held requests now, and hold none from now on."""
        with self._hold:
            self._holding = False
            self._hold.notify_all()

    def cut(self) -> None:
        """Drop every connection, as clients see a daemon restart."""
        with self._lock:
            connections, self._connections = self._connections, set()
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Stop accepting, give up held requests, drop every connection, remove the socket."""
        self._stopped.set()
        with self._hold:
            self._hold.notify_all()
        self._listener.close()
        self._accepter.join(5)
        self.cut()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- plumbing ----------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                self._connections.add(conn)
            if self._upstream is None:
                continue  # keep it open and never answer
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self._upstream)
            except OSError:
                self._drop(conn, upstream)
                continue
            with self._lock:
                self._connections.add(upstream)
            ends = _Ends(conn, upstream, self._drop)
            for target in (self._forward_requests, self._forward_answers):
                threading.Thread(target=target, args=(ends,), daemon=True).start()

    def _forward_answers(self, ends: _Ends) -> None:
        try:
            while data := ends.upstream.recv(_CHUNK):
                ends.client.sendall(data)
        except OSError:
            pass
        ends.finish()

    def _forward_requests(self, ends: _Ends) -> None:
        """Forward the client's requests one by one, holding those a hold is on for."""
        buffer = b""
        try:
            while True:
                while _HEAD_END not in buffer:
                    data = ends.client.recv(_CHUNK)
                    if not data:
                        if buffer:
                            ends.upstream.sendall(buffer)
                        return
                    buffer += data
                head, _, buffer = buffer.partition(_HEAD_END)
                head += _HEAD_END
                fields = _header_fields(head)
                if "chunked" in fields.get("transfer-encoding", "") or "upgrade" in fields:
                    # No more request boundaries to find: pass the rest as it comes.
                    ends.upstream.sendall(head + buffer)
                    while data := ends.client.recv(_CHUNK):
                        ends.upstream.sendall(data)
                    return
                length = int(fields.get("content-length", "0") or 0)
                while len(buffer) < length:
                    data = ends.client.recv(_CHUNK)
                    if not data:
                        break
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                if not self._may_pass(head.split(b"\r\n", 1)[0]):
                    return
                ends.upstream.sendall(head + body)
        except OSError:
            pass
        finally:
            ends.finish()

    def _may_pass(self, request_line: bytes) -> bool:
        """Wait while a hold is on for this request; False when the proxy closes first."""
        with self._hold:
            if not (self._holding and NETWORK_LISTING.match(request_line)):
                return not self._stopped.is_set()
            self._held.append(request_line.decode("latin-1"))
            self._waiting += 1
            try:
                while self._holding and not self._stopped.is_set():
                    self._hold.wait()
            finally:
                self._waiting -= 1
            return not self._stopped.is_set()

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            self._connections.difference_update(socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class _Ends:
    """The two sockets of one forwarded connection; closed when both directions have ended."""

    def __init__(
        self, client: socket.socket, upstream: socket.socket, drop: Callable[..., None]
    ) -> None:
        self.client = client
        self.upstream = upstream
        self._drop = drop
        self._lock = threading.Lock()
        self._running = 2

    def finish(self) -> None:
        """One direction has ended: stop the other, and close both once it has ended too."""
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._drop(self.client, self.upstream)


def _header_fields(head: bytes) -> dict[str, str]:
    """The header fields of a request head, names in lower case (the last of a repeated one)."""
    fields: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            fields[name.strip().lower().decode("latin-1")] = value.strip().lower().decode("latin-1")
    return fields
