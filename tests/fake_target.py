"""A fake AIS target / next ETL stage: a threaded HTTP/1.1 server on 127.0.0.1.

It serves objects to GETs, records every request (method, raw path, query, headers, body), and
answers PUTs from a script of behaviours so tests can make the next hop refuse, reset mid-body,
close without replying, stall, or answer any status.

    with FakeTarget() as t:
        t.objects["/v1/etl/_object/etl-upper/s3cr3tABCD/ais%2F@%23%2Fsrc%2Fhello.txt"] = b"hello"
        t.script = [CloseAfterBody(), Reply(200)]     # first PUT dropped, second stored
        ...
        t.wait_for(2)                                 # bounded wait for 2 recorded requests

``scripts`` holds per-path scripts (request path without the query) consumed before ``script``,
so concurrent requests to different paths each meet their own faults; GETs follow a per-path
script too (a reply, a reset, a stall, a truncated reply), else they serve ``objects``.
``Recorded.complete`` says whether the body ended as announced (``Content-Length`` reached, or
the terminating chunk seen): a real target stores only complete bodies.  :func:`blackhole` is a
listener whose accept queue is full, so connecting to it stalls (connect timeouts).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

SECRET_PATH = "/v1/etl/_object/etl-upper/s3cr3tABCD"


@dataclass
class Recorded:
    method: str
    raw_path: str  # as on the request line, query included
    path: str  # request-line path without the query, still escaped
    query: list[tuple[str, str]]
    headers: dict[str, str]  # last value per name, names as sent
    body: bytes
    chunked: bool
    at: float = field(default_factory=time.monotonic)
    complete: bool = True  # the body ended as announced (length reached / last chunk seen)
    peer_port: int = 0  # the client's port: one per TCP connection

    def header(self, name: str) -> str | None:
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return None


# ---- behaviours ------------------------------------------------------------------------------


@dataclass
class Reply:
    """Read the whole body, answer ``status`` with ``body`` and ``headers``."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class CloseAfterBody:
    """Read the whole body, then close the connection without any reply."""


@dataclass
class ResetMidBody:
    """Read ``after`` bytes of the body (at least one chunk), then reset the connection (RST)."""

    after: int = 1


@dataclass
class ResetBeforeBody:
    """Reset right after the request headers, reading no body."""


@dataclass
class Stall:
    """Read the body, then wait ``seconds`` (or until the test closes the target), no reply."""

    seconds: float = 30.0


@dataclass
class Truncated:
    """Read the body, announce ``Content-Length: declared`` but send only ``body``, then close."""

    status: int = 200
    body: bytes = b"partial"
    declared: int = 1000


class FakeTarget:
    """See module doc. ``script`` is consumed by PUTs in order; ``default`` answers afterwards."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.get_status: dict[str, int] = {}
        self.script: list[object] = []
        self.scripts: dict[str, list[object]] = {}
        self.default: object = Reply(200)
        self.requests: list[Recorded] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        target = self

        class Handler(_Handler):
            fake = target

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    # recorded traffic
    def record(self, rec: Recorded) -> None:
        with self._cond:
            self.requests.append(rec)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Recorded]:
        """Block until ``n`` requests were recorded (bounded by ``timeout``)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.requests) >= n, timeout=timeout)
            if not ok:
                raise AssertionError(f"expected {n} requests, saw {len(self.requests)}")
            return list(self.requests)

    @property
    def puts(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PUT"]

    def reset(self) -> None:
        """Forget recorded traffic, objects and script (a target shared by several tests)."""
        with self._cond:
            self.requests.clear()
            self.objects.clear()
            self.get_status.clear()
            self.script.clear()
            self.scripts.clear()
            self.default = Reply(200)

    def next_behaviour(self, path: str | None = None) -> object:
        with self._cond:
            own = self.scripts.get(path or "")
            if own:
                return own.pop(0)
            return self.script.pop(0) if self.script else self.default

    def next_get_behaviour(self, path: str) -> object | None:
        """The next scripted behaviour for a GET of ``path``, or ``None`` (serve ``objects``)."""
        with self._cond:
            own = self.scripts.get(path)
            return own.pop(0) if own else None

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    """A listen backlog of 5 (socketserver's default) overflows when a test opens a dozen
    connections at once on a loaded machine: the kernel then drops handshakes, and a client
    that already sent its request can get a reset that no script asked for."""

    request_queue_size = 256


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeTarget

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # -- body reading
    def _read_body(self, limit: int | None = None) -> tuple[bytes, bool]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked(limit), True
        declared = int(self.headers.get("Content-Length") or 0)
        length = declared if limit is None else min(declared, limit)
        try:
            body = self.rfile.read(length)
        except OSError:
            body = b""
        self._complete = len(body) == declared
        return body, False

    def _read_chunked(self, limit: int | None) -> bytes:
        out = bytearray()
        self._complete = False
        try:
            while True:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    break
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    self._complete = True
                    break
                out += self.rfile.read(size)
                self.rfile.readline(1024)
                if limit is not None and len(out) >= limit:
                    break
        except (OSError, ValueError):  # the sender went away mid-body
            pass
        return bytes(out)

    _complete = True

    def _record(self, body: bytes, chunked: bool) -> None:
        parts = urlsplit(self.path)
        self.fake.record(
            Recorded(
                method=self.command,
                raw_path=self.path,
                path=parts.path,
                query=parse_qsl(parts.query, keep_blank_values=True),
                headers=dict(self.headers.items()),
                body=body,
                chunked=chunked,
                complete=self._complete,
                peer_port=self.client_address[1],
            )
        )

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    # -- methods
    def do_GET(self) -> None:
        body, chunked = self._read_body()
        self._record(body, chunked)
        path = urlsplit(self.path).path
        behaviour = self.fake.next_get_behaviour(path)
        if behaviour is not None:
            self._misbehave(behaviour)
            return
        status = self.fake.get_status.get(path)
        if status is not None:
            self._send(status, b"error from fake target")
        elif path in self.fake.objects:
            self._send(200, self.fake.objects[path])
        else:
            self._send(404, b"not found")

    def _misbehave(self, behaviour: object) -> None:
        """A scripted answer to a GET whose request was read: reply, reset, stall or truncate."""
        if isinstance(behaviour, Reply):
            self._send(behaviour.status, behaviour.body, behaviour.headers)
        elif isinstance(behaviour, (ResetBeforeBody, ResetMidBody)):
            self._reset()
        else:
            self._after_body(behaviour)

    def do_PUT(self) -> None:
        behaviour = self.fake.next_behaviour(urlsplit(self.path).path)
        if isinstance(behaviour, ResetBeforeBody):
            self._complete = False
            self._record(b"", False)
            self._reset()
            return
        if isinstance(behaviour, ResetMidBody):
            body, chunked = self._read_body(limit=behaviour.after)
            self._record(body, chunked)
            self._reset()
            return
        body, chunked = self._read_body()
        self._record(body, chunked)
        if isinstance(behaviour, Reply):
            self._send(behaviour.status, behaviour.body, behaviour.headers)
        else:
            self._after_body(behaviour)

    def _after_body(self, behaviour: object) -> None:
        if isinstance(behaviour, CloseAfterBody):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif isinstance(behaviour, Stall):
            self.fake._closing.wait(behaviour.seconds)
            self.close_connection = True
        elif isinstance(behaviour, Truncated):
            self.send_response(behaviour.status)
            self.send_header("Content-Length", str(behaviour.declared))
            self.end_headers()
            self.wfile.write(behaviour.body)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:  # pragma: no cover
            raise AssertionError(f"unknown behaviour {behaviour!r}")


@contextmanager
def blackhole() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a listener that never accepts and whose queue is full.

    A connect to it stalls (the kernel drops the SYN while the accept queue is full) until the
    client's connect timeout: the "target unreachable, no RST" fault.
    """
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())  # takes the one queue slot
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
