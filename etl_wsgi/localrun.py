"""``etl-wsgi run``: a bucket-to-bucket transform on one machine, no cluster.

The real server (gunicorn, gevent workers, :class:`etl_wsgi.testing.GunicornServer`) is driven
by a stand-in for the AIS target: :class:`LocalTarget`, a threaded ``http.server`` on 127.0.0.1
that plays the target's two roles.

* **Client of the ETL** (:class:`HttpClient`, :class:`WsClient`): one request per object, exactly
  as the target sends it - hpush ``PUT /<bucket>/<obj>`` with an empty body and ``etl_fqn``, or
  the object bytes (PROTOCOL.md §2.2); hpull ``GET /<PathEscape(uname)>`` (§2.3); ``etl_fqn``
  path-escaped then query-encoded (§3); ``etl_args`` only when non-empty (§2.4); WebSocket
  control + data messages (§6.2) with FIFO replies (§6.3).
* **Server for the ETL** (:class:`LocalTarget`): ``AIS_TARGET_URL`` points at it, so an hpull
  without ``etl_fqn`` GETs the object back from it (§2.6), and a direct put (``Ais-Node-Url``
  names it as the destination target, §4.1-§4.2) lands in the destination directory.

Object names are the paths under the source directory (``/``-separated); the source bucket is
``src``, the destination ``dst`` (so ``transform()`` sees ``path`` = ``src/<name>`` for hpush).
No click here: the CLI (:mod:`etl_wsgi.cli`) presents progress and the summary.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import select
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from etl_wsgi.const import (
    ETL_WS_ETL_ARGS,
    ETL_WS_FQN,
    ETL_WS_PATH,
    ETL_WS_PIPELINE,
    HEADER_NODE_URL,
    QPARAM_ETL_ARGS,
    QPARAM_ETL_FQN,
)
from etl_wsgi.testing import GunicornServer

COMMS = ("hpush", "hpull", "ws")
SRC_BUCKET = "src"
DST_BUCKET = "dst"
#: ``AIS_TARGET_URL`` path of the stand-in: ``/v1/etl/_object/<etl-name>/<10-char secret>``.
SECRET_PATH = "/v1/etl/_object/local/l0calS3cr3t"
#: Seconds any socket operation of the runner may wait (connect, send, next bytes of a reply).
IO_TIMEOUT = 300.0
CHUNK = 1 << 20
#: Settings the runner sets itself; the caller's other ETL_*/AIS_* settings reach the server.
_RUNNER_OWNED = frozenset({"AIS_TARGET_URL", "ETL_BIND", "ETL_WORKERS", "NUM_WORKERS"})


#: What the body readers read from: a request's ``rfile``, a response, a file.
Readable = io.BufferedIOBase | IO[bytes]


def path_escape(text: str) -> str:
    """Go's ``url.PathEscape``: keeps ``$ & + : = @``, escapes ``/``, ``#``, ``%`` (§2.3, §3)."""
    return quote(text, safe="$&+:=@")


def uname(bucket: str, name: str) -> str:
    """``ais/@#/<bucket>/<name>``: provider, global namespace, bucket, object (§2.3)."""
    return f"ais/@#/{bucket}/{name}"


@dataclass(frozen=True)
class Obj:
    name: str
    path: Path
    size: int


@dataclass(frozen=True)
class Outcome:
    """What became of one object: bytes written to the destination, or an error message."""

    obj: Obj
    written: int = 0
    error: str = ""


@dataclass(frozen=True)
class Job:
    src: Path
    dst: Path
    comm: str = "hpush"
    fqn: bool = True
    direct_put: bool = False
    etl_args: str = ""
    jobs: int = 4

    def direct_put_hop(self, target_url: str, name: str) -> str:
        """``Ais-Node-Url`` naming the destination target: its URL + escaped dst uname (§4.1)."""
        return f"{target_url}/{path_escape(uname(DST_BUCKET, name))}?owt=3&uuid=local-run"


@dataclass
class Summary:
    objects: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    failures: list[Outcome] = field(default_factory=list)


def list_objects(src: Path) -> list[Obj]:
    """Every regular file under ``src`` (recursively, sorted), named by its relative path."""
    found = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for fname in sorted(files):
            path = Path(root) / fname
            if path.is_file():
                name = path.relative_to(src).as_posix()
                found.append(Obj(name, path.resolve(), path.stat().st_size))
    return found


def destination(dst: Path, name: str) -> Path:
    """``dst/name``, refusing names that would escape ``dst`` (``..``, absolute paths)."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object name {name!r}")
    return dst.joinpath(*parts)


class Sink:
    """``dst/name`` written atomically: a temporary file, renamed by :meth:`commit`."""

    def __init__(self, dst: Path, name: str) -> None:
        self.final = destination(dst, name)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{self.final.name}.{uuid.uuid4().hex[:8]}.part")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit() or abort()
        self.written = 0

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.written += len(chunk)

    def commit(self) -> int:
        self.file.close()
        os.replace(self.tmp, self.final)
        return self.written

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def store(dst: Path, name: str, chunks: Iterator[bytes]) -> int:
    """Write ``chunks`` to ``dst/name`` atomically; the number of bytes written."""
    sink = Sink(dst, name)
    try:
        for chunk in chunks:
            sink.write(chunk)
        return sink.commit()
    finally:
        sink.abort()  # no-op after commit: the file is closed and renamed


def read_chunks(reader: Readable, length: int | None) -> Iterator[bytes]:
    """``length`` bytes of ``reader`` (all of it when ``None``) in chunks; short read = error."""
    left = length
    while left is None or left > 0:
        chunk = reader.read(CHUNK if left is None else min(CHUNK, left))
        if not chunk:
            if left:
                raise OSError(f"body ended {left} bytes early")
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


def read_chunked(reader: Readable) -> Iterator[bytes]:
    """Decode a ``Transfer-Encoding: chunked`` body (streaming direct puts send one, §4.2)."""
    while True:
        line = reader.readline(1024)
        if not line:
            raise OSError("chunked body ended early")
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while reader.readline(1024) not in (b"\r\n", b"\n", b""):
                pass
            return
        yield from read_chunks(reader, size)
        reader.readline(1024)


# ---- the stand-in target ------------------------------------------------------------------------


class LocalTarget:
    """The AIS target's server side: objects of ``src`` by GET, direct puts into ``dst``."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.src = src
        self.dst = dst
        self.delivered: dict[str, int] = {}
        self._lock = threading.Lock()
        target = self

        class Handler(_TargetHandler):
            local = target

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def deliver(self, name: str, size: int) -> None:
        with self._lock:
            self.delivered[name] = size

    def delivered_size(self, name: str) -> int | None:
        with self._lock:
            return self.delivered.get(name)

    def object_name(self, raw_path: str, bucket: str) -> str:
        """``<SECRET_PATH>/<escaped uname>`` -> object name; ``ValueError`` if not ours (§2.6)."""
        path = urlsplit(raw_path).path
        if not path.startswith(SECRET_PATH + "/"):
            raise ValueError(f"not an ETL object path of this target: {path!r}")
        prefix = uname(bucket, "")
        full = unquote(path[len(SECRET_PATH) + 1 :])
        if not full.startswith(prefix):
            raise ValueError(f"{full!r} is not in bucket {bucket!r}")
        return full[len(prefix) :]

    def __enter__(self) -> LocalTarget:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _TargetHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    local: LocalTarget

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        """hpull without ``etl_fqn``: the ETL fetches the object back (§2.6)."""
        try:
            path = destination(self.local.src, self.local.object_name(self.path, SRC_BUCKET))
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except (ValueError, OSError) as exc:
            self._answer(HTTPStatus.NOT_FOUND, str(exc).encode())
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, CHUNK)

    def do_PUT(self) -> None:
        """A direct put to the destination target: store the object in ``dst`` (§4.2-§4.3)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = read_chunked(self.rfile)
        else:
            body = read_chunks(self.rfile, int(self.headers.get("Content-Length") or 0))
        try:
            name = self.local.object_name(self.path, DST_BUCKET)
            size = store(self.local.dst, name, body)
        except (ValueError, OSError) as exc:
            self.close_connection = True  # the body may be unread
            self._answer(HTTPStatus.BAD_REQUEST, str(exc).encode())
            return
        self.local.deliver(name, size)
        self._answer(HTTPStatus.OK)  # the destination's reply: 200, empty (§4.3)


# ---- clients: the target's side of each transport ------------------------------------------------


def error_message(status: int, body: bytes) -> str:
    """``HTTP <status>: <message>``, the message from etl-wsgi's ``{"error": ...}`` if it is one."""
    text = body.decode("utf-8", "replace").strip()
    try:
        text = str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        pass
    return f"HTTP {status}: {text[:500]}"


class Client:
    """One connection to the ETL, used by one thread; ``transfer`` one object at a time."""

    def __init__(self, job: Job, server_url: str, target: LocalTarget) -> None:
        self.job = job
        parts = urlsplit(server_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.target = target

    def transfer(self, obj: Obj) -> Outcome:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def delivered(self, obj: Obj) -> Outcome:
        """The ETL says it delivered by direct put: the stand-in must have stored the object."""
        size = self.target.delivered_size(obj.name)
        if size is None:
            return Outcome(obj, error="ETL reported a direct put, but nothing was delivered")
        return Outcome(obj, written=size)


class HttpClient(Client):
    """hpush (``PUT``) and hpull (``GET``) on a kept-alive ``http.client`` connection.

    A request body is sent from a helper thread while the reply is read, as the Go target does:
    a streaming transform answers while it still reads, and a client that sends everything first
    would deadlock on large objects.
    """

    def __init__(self, job: Job, server_url: str, target: LocalTarget) -> None:
        super().__init__(job, server_url, target)
        self.conn: http.client.HTTPConnection | None = None

    def request_line(self, obj: Obj) -> tuple[str, str]:
        query = []
        if self.job.fqn:
            query.append((QPARAM_ETL_FQN, path_escape(str(obj.path))))
        if self.job.etl_args:
            query.append((QPARAM_ETL_ARGS, self.job.etl_args))
        if self.job.comm == "hpull":
            method, path = "GET", "/" + path_escape(uname(SRC_BUCKET, obj.name))
        else:
            method, path = "PUT", "/" + quote(f"{SRC_BUCKET}/{obj.name}")
        return method, path + (f"?{urlencode(query)}" if query else "")

    def transfer(self, obj: Obj) -> Outcome:
        try:
            return self._exchange(obj, retry_stale=self.conn is not None)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.close()
            return Outcome(obj, error=f"{type(exc).__name__}: {exc}")

    def _exchange(self, obj: Obj, retry_stale: bool) -> Outcome:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=IO_TIMEOUT)
        method, target = self.request_line(obj)
        self.conn.putrequest(method, target, skip_accept_encoding=True)
        if self.job.direct_put:
            self.conn.putheader(HEADER_NODE_URL, self.job.direct_put_hop(self.target.url, obj.name))
        sends_body = method == "PUT" and not self.job.fqn
        if method == "PUT":
            self.conn.putheader("Content-Length", str(obj.size if sends_body else 0))
        try:
            self.conn.endheaders()
            sender = _BodySender(self.conn, obj.path) if sends_body else None
            try:
                resp = self.conn.getresponse()
                with resp:  # read while the body is still being sent (see the class doc)
                    outcome = self._outcome(obj, resp)
            finally:
                if sender is not None:
                    sender.join()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.close()
            if not retry_stale:  # a kept-alive connection the server closed meanwhile: once more
                raise
            return self._exchange(obj, retry_stale=False)
        if resp.will_close or (sender is not None and sender.error is not None):
            self.close()
        return outcome

    def _outcome(self, obj: Obj, resp: http.client.HTTPResponse) -> Outcome:
        if resp.status in (HTTPStatus.OK, HTTPStatus.ACCEPTED):
            return Outcome(obj, written=store(self.job.dst, obj.name, read_chunks(resp, None)))
        body = resp.read()
        if resp.status == HTTPStatus.NO_CONTENT:
            return self.delivered(obj)
        return Outcome(obj, error=error_message(resp.status, body))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class _BodySender(threading.Thread):
    """Sends a file as the request body; a failure is kept (the reply tells what happened)."""

    def __init__(self, conn: http.client.HTTPConnection, path: Path) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.path = path
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with open(self.path, "rb") as f:
                for chunk in read_chunks(f, None):
                    self.conn.send(chunk)
        except OSError as exc:
            self.error = exc


class WsClosed(Exception):
    """The ETL closed the WebSocket (1011 = the task failed, with a reason) or the socket broke."""


class WsClient(Client):
    """One WebSocket connection to ``/ws`` speaking the target's side of PROTOCOL.md §6.

    Sans-I/O wsproto over a non-blocking socket: one loop sends the task's messages while it
    reads the reply, so a streaming transform answering before its input is complete never
    deadlocks.  After a close (the ETL closes with 1011 when a task fails) the next object opens a
    new connection, as the target does.
    """

    def __init__(self, job: Job, server_url: str, target: LocalTarget) -> None:
        super().__init__(job, server_url, target)
        self.sock: socket.socket | None = None
        self.ws = WSConnection(ConnectionType.CLIENT)

    def connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=IO_TIMEOUT)
        self.sock.setblocking(False)
        self.ws = WSConnection(ConnectionType.CLIENT)
        handshake = self.ws.send(Request(host=f"{self.host}:{self.port}", target="/ws"))
        reply = _WsReply(self.job.dst, "")
        self._pump(iter([handshake]), reply)

    def messages(self, obj: Obj) -> Iterator[bytes]:
        """Wire bytes of one task: the control message, then the data unless ``fqn`` (§6.2)."""
        control: dict[str, str] = {}
        if self.job.direct_put:
            control[ETL_WS_PIPELINE] = self.job.direct_put_hop(self.target.url, obj.name)
        if self.job.etl_args:
            control[ETL_WS_ETL_ARGS] = self.job.etl_args
        if self.job.fqn:
            control[ETL_WS_FQN] = path_escape(str(obj.path))
        control[ETL_WS_PATH] = obj.name
        yield self.ws.send(BytesMessage(data=json.dumps(control).encode()))
        if self.job.fqn:
            return
        with open(obj.path, "rb") as f:
            chunk = f.read(CHUNK)
            while True:
                following = f.read(CHUNK) if chunk else b""
                yield self.ws.send(BytesMessage(data=chunk, message_finished=not following))
                if not following:
                    return
                chunk = following

    def transfer(self, obj: Obj) -> Outcome:
        try:
            if self.sock is None:
                self.connect()
            reply = _WsReply(self.job.dst, obj.name)
            try:
                self._pump(self.messages(obj), reply)
            finally:
                reply.abort()
        except (WsClosed, OSError, ValueError) as exc:
            self.close()
            return Outcome(obj, error=str(exc) or type(exc).__name__)
        if reply.text is not None:  # text = delivered by direct put (§6.3)
            return self.delivered(obj)
        return Outcome(obj, written=reply.written)

    def _pump(self, outgoing: Iterator[bytes], reply: _WsReply) -> None:
        """Send ``outgoing`` and feed received events to ``reply`` until it is complete."""
        assert self.sock is not None
        pending = b""
        deadline = time.monotonic() + IO_TIMEOUT
        while not reply.done:
            if not pending:
                pending = next(outgoing, b"")
            readable, writable, _ = select.select(
                [self.sock], [self.sock] if pending else [], [], 1.0
            )
            if not readable and not writable:
                if time.monotonic() > deadline:
                    raise WsClosed(f"no reply from the ETL within {IO_TIMEOUT:.0f}s")
                continue
            deadline = time.monotonic() + IO_TIMEOUT
            if writable:
                try:
                    pending = pending[self.sock.send(pending) :]
                except BlockingIOError:
                    pass
            if readable:
                self._receive(reply)

    def _receive(self, reply: _WsReply) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(CHUNK)
        except BlockingIOError:
            return
        self.ws.receive_data(data or None)
        for event in self.ws.events():
            if isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise WsClosed(f"WebSocket closed by the ETL: {event.code} {event.reason or ''}")
            elif isinstance(event, RejectConnection):
                raise WsClosed(f"WebSocket upgrade refused: HTTP {event.status_code}")
            else:
                reply.feed(event)
        if not data:
            raise WsClosed("connection closed by the ETL")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _WsReply:
    """One reply message (§6.3): text = delivered count, binary = the object, stored as it comes.

    With ``name`` empty it waits for the handshake's ``AcceptConnection`` instead.
    """

    def __init__(self, dst: Path, name: str) -> None:
        self.dst = dst
        self.name = name
        self.done = False
        self.text: str | None = None
        self.written = 0
        self.sink: Sink | None = None

    def feed(self, event: Any) -> None:
        if not self.name:
            self.done = isinstance(event, AcceptConnection)
        elif isinstance(event, TextMessage):
            self.text = (self.text or "") + event.data
            self.done = event.message_finished
        elif isinstance(event, BytesMessage):
            if self.sink is None:
                self.sink = Sink(self.dst, self.name)
            self.sink.write(bytes(event.data))
            if event.message_finished:
                self.written = self.sink.commit()
                self.done = True

    def abort(self) -> None:
        if self.sink is not None and not self.done:
            self.sink.abort()


# ---- the job -----------------------------------------------------------------------------------


def server_env(environ: Mapping[str, str], target_url: str) -> dict[str, str]:
    """The caller's ETL_*/AIS_* settings for the server, with ``AIS_TARGET_URL`` = the stand-in."""
    env = {
        k: v
        for k, v in environ.items()
        if k.startswith(("ETL_", "AIS_")) and k not in _RUNNER_OWNED
    }
    env["AIS_TARGET_URL"] = target_url + SECRET_PATH
    return env


CLIENTS: dict[str, type[Client]] = {"hpush": HttpClient, "hpull": HttpClient, "ws": WsClient}


def transform_all(
    job: Job,
    objects: list[Obj],
    server_url: str,
    target: LocalTarget,
    on_done: Callable[[Outcome], None],
) -> Summary:
    """Send every object through the ETL with ``job.jobs`` threads, one connection each."""
    local = threading.local()
    clients: list[Client] = []
    lock = threading.Lock()

    def one(obj: Obj) -> Outcome:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = CLIENTS[job.comm](job, server_url, target)
            with lock:
                clients.append(client)
        return client.transfer(obj)

    summary = Summary(objects=len(objects), bytes_in=sum(o.size for o in objects))
    start = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=job.jobs, thread_name_prefix="etl-run")
    completed = False
    try:
        for outcome in pool.map(one, objects):
            summary.bytes_out += outcome.written
            if outcome.error:
                summary.failures.append(outcome)
            on_done(outcome)
        completed = True
    finally:
        # Interrupted (Ctrl-C, SIGTERM): objects not started are dropped and nobody waits for
        # the in-flight ones; stopping the server next ends them.
        pool.shutdown(wait=completed, cancel_futures=True)
        if completed:
            for client in clients:
                client.close()
    summary.seconds = time.monotonic() - start
    return summary


@dataclass(frozen=True)
class Running:
    """A booted server and stand-in target: :meth:`transform` objects through them."""

    job: Job
    server_url: str
    target: LocalTarget

    def transform(self, objects: list[Obj], on_done: Callable[[Outcome], None]) -> Summary:
        return transform_all(self.job, objects, self.server_url, self.target, on_done)


@contextmanager
def running(
    job: Job, etl_class: str, workers: int, environ: Mapping[str, str] | None = None
) -> Iterator[Running]:
    """Boot the stand-in target and gunicorn serving ``etl_class``; stop both afterwards.

    ``RuntimeError`` (with the server's log) if the server does not come up.
    """
    job.dst.mkdir(parents=True, exist_ok=True)
    env = os.environ if environ is None else environ
    with LocalTarget(job.src, job.dst) as target:
        server = GunicornServer(
            f"etl_wsgi.app:create_app({etl_class!r})",
            server_env(env, target.url),
            workers,
            pythonpath=[os.getcwd()],
        )
        try:
            try:
                server.start()
            except RuntimeError as exc:
                raise ServerStartError(startup_error(str(exc))) from exc
            yield Running(job, server.url, target)
        finally:
            server.stop()


class ServerStartError(Exception):
    """gunicorn did not come up; the message is the cause found in its log."""


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*")


def startup_error(log: str) -> str:
    """The first exception line of gunicorn's log (a worker's import or init failure), or its tail.

    gunicorn prints full tracebacks; the user needs the one line that says what is wrong.
    """
    for line in log.splitlines():
        if _EXCEPTION_LINE.match(line) and "HaltServer" not in line:
            return line.strip()
    return "\n".join(log.strip().splitlines()[-15:])
