"""WebSocket transport ``/ws`` (PROTOCOL.md §6) on the same app and gunicorn gevent workers.

Why wsproto: a maintained, sans-I/O WebSocket implementation (python-hyper), so it runs on
whatever socket the server hands over (gunicorn's, patched by gevent; Werkzeug's in
development), and it gives the control we need: incremental receive of very large messages,
fragmented sends (continuation frames) for streaming output, and explicit close codes.

Per connection (§6.2-§6.3): a reader reads tasks (a binary JSON control message, then a binary
data message unless the control has ``fqn``) into a small bounded queue; the worker takes them in
order, transforms, and sends exactly one reply per task, so replies stay FIFO while the next
task's input is already being read.  Replies: binary = transformed bytes; with ``pipeline`` the
server delivers by direct put (same URL composition and retry loop as HTTP) and replies with a
text frame holding the delivered byte count.

Failure is never a success frame (unlike aistore's FastAPI server, whose error *text* frames the
target counts as delivered, §6.3): a transform error, a bad pipeline or a failed direct put closes
the connection with code 1011 and a short reason, as AIS's Go framework does; the target fails
the in-flight tasks.  The cause is logged.

Threads and queues come from the standard library: under gunicorn's gevent worker they are
greenlets (monkey-patched), under Werkzeug's development server real threads.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, TYPE_CHECKING, Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from etl_wsgi import lifecycle
from etl_wsgi.const import ETL_WS_ETL_ARGS, ETL_WS_FQN, ETL_WS_PATH, ETL_WS_PIPELINE
from etl_wsgi.errors import USER_CODE_FAILURES, BadRequestError, ETLError, as_etl_error
from etl_wsgi.handler import Reply, checked_pipeline, handle, log_error, redact
from etl_wsgi.metrics import ROUTE_WS
from etl_wsgi.protocol import ParsedRequest
from etl_wsgi.sources import FileSource, Source, _DelegatingReader

if TYPE_CHECKING:
    from etl_wsgi.base_etl_server import ETLServer

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024
#: How long a closing session waits for the peer's close frame before dropping the socket.
CLOSE_WAIT_SECONDS = 5.0
#: Largest control message (JSON with fqn, path, etl_args, pipeline).
CONTROL_LIMIT = 1 << 20
#: Largest close reason the protocol allows (125-byte control payload minus the 2-byte code).
MAX_CLOSE_REASON = 123
#: Chunks of a streamed data message buffered between reader and transform (backpressure).
STREAM_QUEUE_CHUNKS = 16

_SESSIONS: weakref.WeakSet[WebSocketSession] = weakref.WeakSet()

_EOF = object()
_STOP = object()


class WebSocketClosed(Exception):
    """The peer closed (or the socket failed) before the session ended."""


class _TooBig(Exception):
    code = CloseReason.MESSAGE_TOO_BIG


def is_upgrade(environ: dict[str, Any]) -> bool:
    """A WebSocket upgrade request (``Upgrade: websocket``, ``Connection: upgrade``)."""
    return (
        environ.get("REQUEST_METHOD") == "GET"
        and environ.get("HTTP_UPGRADE", "").lower() == "websocket"
        and "upgrade" in environ.get("HTTP_CONNECTION", "").lower()
    )


def raw_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The connection's socket: gunicorn (production) or Werkzeug's dev server."""
    return environ.get("gunicorn.socket") or environ.get("werkzeug.socket")


def serve_websocket(etl: ETLServer, environ: dict[str, Any]) -> None:
    """Accept the upgrade on the connection's socket and serve tasks until it closes."""
    sock = raw_socket(environ)
    if sock is None:
        raise BadRequestError("this server cannot hand over its socket for WebSocket")
    session = WebSocketSession(etl, sock, etl.settings.ws_prefetch, etl.settings.ws_max_message)
    if not session.accept(environ):
        raise BadRequestError("invalid WebSocket upgrade request")
    session.run()


# --- inputs -----------------------------------------------------------------------------------


class BytesSource(Source):
    """A whole data message in memory: replayable."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def size_hint(self) -> int | None:
        return len(self.data)

    def read_all(self) -> bytes:
        return self.data

    def open(self) -> IO[bytes]:
        return io.BytesIO(self.data)


class ChunkQueueReader:
    """File-like reader over chunks the connection's reader pushes while the message arrives."""

    def __init__(self) -> None:
        self.chunks: queue.Queue[object] = queue.Queue(maxsize=STREAM_QUEUE_CHUNKS)
        self._buf = b""
        self._eof = False

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._buf]
            self._buf = b""
            while not self._eof:
                parts.append(self._next())
            return b"".join(parts)
        while not self._buf and not self._eof:
            self._buf = self._next()
        out, self._buf = self._buf[:size], self._buf[size:]
        return out

    def _next(self) -> bytes:
        item = self.chunks.get()
        if item is _EOF:
            self._eof = True
            return b""
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        return item  # type: ignore[return-value]

    def drain(self) -> None:
        """Consume what the transform left unread, so the reader can go on to the next task."""
        while not self._eof:
            try:
                self._next()
            except WebSocketClosed:  # the only exception the connection's reader queues
                return

    def close(self) -> None:
        self.drain()


class StreamSource(Source):
    """A data message being received: one-shot (not replayable), read as it arrives."""

    replayable = False

    def __init__(self, reader: ChunkQueueReader) -> None:
        self.reader = reader

    def open(self) -> IO[bytes]:
        return _DelegatingReader(self.reader)  # type: ignore[arg-type, return-value]


@dataclass
class Task:
    """One object: its control fields and its input."""

    req: ParsedRequest
    source: Source

    def close(self, etl: ETLServer) -> None:
        """Drain a streamed data message the transform left unread (no-op for other inputs)."""
        etl.close_reader(getattr(self.source, "reader", None))


# --- the session ------------------------------------------------------------------------------


class WebSocketSession:
    """One accepted connection; :meth:`run` returns when it is over (socket closed)."""

    def __init__(self, etl: ETLServer, sock: socket.socket, prefetch: int, max_message: int):
        self.etl = etl
        self.sock = sock
        self.ws = WSConnection(ConnectionType.SERVER)
        self.tasks: queue.Queue[object] = queue.Queue(maxsize=max(1, prefetch))
        self.max_message = max_message
        self._send_lock = threading.Lock()
        self._closed = False
        self._busy = False  # the worker is transforming or replying
        self._at_boundary = False  # the reader waits for the next control message
        self._going_away = False
        self._reader_stopped = False

    # handshake
    def accept(self, environ: dict[str, Any]) -> bool:
        headers = [
            (key[5:].replace("_", "-").lower().encode("latin-1"), str(value).encode("latin-1"))
            for key, value in environ.items()
            if key.startswith("HTTP_")
        ]
        path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")) or "/ws"
        self.ws.initiate_upgrade_connection(headers, path)
        for event in self.ws.events():
            if isinstance(event, Request):
                self._write(self.ws.send(AcceptConnection()))
                return True
        return False

    def run(self) -> None:
        reader = threading.Thread(target=self._read_loop, name="ws-reader", daemon=True)
        # Registered before the reader starts: starting a thread yields to the event loop, where
        # a stop notification may run; one that came earlier is caught by stopping().
        _SESSIONS.add(self)
        reader.start()
        if lifecycle.stopping():
            self.going_away()
        try:
            self._work_loop()
        finally:
            _SESSIONS.discard(self)
            # Close handshake: send our close (if not sent yet), then keep reading (and
            # discarding) until the peer answers or a deadline passes, so a close reason is not
            # lost in a reset caused by unread data.
            self.close(CloseReason.GOING_AWAY if self._going_away else CloseReason.NORMAL_CLOSURE)
            self._discard_tasks(CLOSE_WAIT_SECONDS)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            reader.join(timeout=CLOSE_WAIT_SECONDS)

    def _discard_tasks(self, seconds: float) -> None:
        """After the worker stopped: unblock the reader until it has put its final ``_STOP``."""
        deadline = time.monotonic() + seconds
        while not self._reader_stopped:
            try:
                task = self.tasks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if task is _STOP:
                self._reader_stopped = True
                return
            if isinstance(task, Task):
                task.close(self.etl)

    def going_away(self) -> None:
        """The worker is stopping: close now if idle (1001), else after the task in flight."""
        self._going_away = True
        self._close_if_going_away()

    def _close_if_going_away(self) -> None:
        """Close with 1001 if stopping and idle: checked on stop, after a task, at a boundary."""
        if self._going_away and self._idle():
            self.close(CloseReason.GOING_AWAY, "server shutting down")

    def _idle(self) -> bool:
        return self._at_boundary and not self._busy and self.tasks.empty()

    # the worker: one reply per task, in order
    def _work_loop(self) -> None:
        while True:
            task = self.tasks.get()
            if task is _STOP:
                self._reader_stopped = True
                return
            assert isinstance(task, Task)
            self._busy = True
            try:
                self._process(task)
            except WebSocketClosed:
                return
            except USER_CODE_FAILURES as exc:  # also a user hook's sys.exit(): 1011, worker lives
                self._fail(task, exc)
                return
            finally:
                self._busy = False
                task.close(self.etl)
            self._close_if_going_away()

    def _process(self, task: Task) -> None:
        reply = handle(self.etl, task.req, task.source, ROUTE_WS)
        try:
            self._reply(task, reply)
        finally:
            self.etl.memory_budget.release(reply.held)

    def _reply(self, task: Task, reply: Reply) -> None:
        if task.req.node_url.strip():  # delivered by direct put, or the last stage's output
            if reply.status == HTTPStatus.NO_CONTENT:
                delivered = reply.headers.get("Ais-Direct-Put-Length", "0")
                self._send(Message(data=delivered))
                return
            if reply.status != HTTPStatus.OK:
                body = reply.body if isinstance(reply.body, bytes) else b""
                raise ETLError(
                    f"direct put failed: HTTP {reply.status}: "
                    f"{body[:200].decode('utf-8', 'replace')}",
                    status=reply.status,
                )
        if isinstance(reply.body, bytes):
            self._send(Message(data=reply.body))
        else:
            self._send_stream(reply.body)

    def _send_stream(self, chunks: Iterable[bytes]) -> None:
        """One binary message in fragments: constant memory for streaming transforms."""
        try:
            previous: bytes | None = None
            for chunk in chunks:
                if not chunk:
                    continue
                if previous is not None:
                    self._send(Message(data=previous, message_finished=False))
                previous = chunk
            self._send(Message(data=previous or b"", message_finished=True))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _fail(self, task: Task, exc: BaseException) -> None:
        """Close with 1011; the failure is logged once (a cut stream was logged already)."""
        error = as_etl_error(exc)
        if error.logged:
            message = redact(self.etl, error.message)
        else:
            trace = None if error is exc else exc
            message = log_error(
                self.etl, "ws", task.req.path, error, "closing connection with 1011", trace
            )
        self.close(CloseReason.INTERNAL_ERROR, message)

    # the reader: tasks in, bounded
    def _read_loop(self) -> None:
        stream: ChunkQueueReader | None = None
        path = ""  # of the task being read, once its control message is parsed
        try:
            events = self._events()
            while True:
                self._at_boundary = True
                self._close_if_going_away()
                path = ""
                req = _parse_control(self._read_message(events, CONTROL_LIMIT))
                path = req.path
                # a bad or disallowed pipeline fails before the data message is read (§4.1)
                checked_pipeline(self.etl, req)
                if req.fqn:
                    source = FileSource(req.fqn, req.path, self.etl.settings.fqn_roots)
                    self.tasks.put(Task(req, source))
                elif self.etl.use_streaming:
                    stream = ChunkQueueReader()
                    self.tasks.put(Task(req, StreamSource(stream)))
                    self._pump(events, stream)
                    stream = None
                else:
                    data = self._read_message(events, self.max_message)
                    self.tasks.put(Task(req, BytesSource(data)))
        except WebSocketClosed as exc:
            if stream is not None:
                stream.chunks.put(exc)
        except Exception as exc:
            if stream is not None:
                stream.chunks.put(WebSocketClosed(str(exc)))
            # ETLError.message, as on the worker's path: "Invalid pipeline header: ..." (§10 #12)
            message = exc.message if isinstance(exc, ETLError) else str(exc)
            log.error(
                "ws %r: reading the task failed: %s",
                path,
                message,
                extra={"path": path, "cause": message},
            )
            code = exc.code if isinstance(exc, _TooBig) else CloseReason.INTERNAL_ERROR
            self.close(code, f"bad task: {message}")
        finally:
            self.tasks.put(_STOP)

    def _events(self) -> Iterator[BytesMessage | TextMessage]:
        """Data events; answers pings, ends with :class:`WebSocketClosed` on close or EOF."""
        while True:
            try:
                data = self.sock.recv(RECV_BYTES)
            except OSError as exc:
                raise WebSocketClosed(str(exc)) from exc
            if not data:
                raise WebSocketClosed("connection closed by peer")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, (BytesMessage, TextMessage)):
                    yield event
                elif isinstance(event, Ping):
                    self._send(event.response())
                elif isinstance(event, CloseConnection):
                    self._answer_close(event)
                    raise WebSocketClosed(f"closed by peer: {event.code} {event.reason}")

    def _read_message(self, events: Iterator[BytesMessage | TextMessage], limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        for event in events:
            self._at_boundary = False
            data = _payload(event)
            size += len(data)
            if size > limit:
                raise _TooBig(f"message larger than {limit} bytes")
            parts.append(data)
            if event.message_finished:
                return b"".join(parts)
        raise WebSocketClosed("connection closed mid-message")  # pragma: no cover

    def _pump(self, events: Iterator[BytesMessage | TextMessage], stream: ChunkQueueReader) -> None:
        """Feed one data message into ``stream`` as it arrives (blocks while the transform lags)."""
        for event in events:
            data = _payload(event)
            if data:
                stream.chunks.put(data)
            if event.message_finished:
                stream.chunks.put(_EOF)
                return

    # I/O
    def _send(self, event: Any) -> None:
        with self._send_lock:
            if self._closed:
                raise WebSocketClosed("connection closed")
            self._write(self.ws.send(event))

    def _write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self._closed = True
            raise WebSocketClosed(str(exc)) from exc

    def _answer_close(self, event: CloseConnection) -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.sock.sendall(self.ws.send(event.response()))
            except Exception:  # already gone
                pass

    def close(self, code: int, reason: str = "") -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.sock.sendall(self.ws.send(CloseConnection(code, _short(reason))))
            except Exception:  # already gone
                pass


def _payload(event: BytesMessage | TextMessage) -> bytes:
    return event.data.encode() if isinstance(event.data, str) else bytes(event.data)


def _short(reason: str) -> str:
    data = reason.encode("utf-8")[:MAX_CLOSE_REASON]
    return data.decode("utf-8", "ignore")


def _parse_control(raw: bytes) -> ParsedRequest:
    try:
        control = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequestError(f"control message is not JSON: {exc}") from None
    if not isinstance(control, dict):
        raise BadRequestError("control message is not a JSON object")
    return ParsedRequest(
        method="PUT",
        path=str(control.get(ETL_WS_PATH) or ""),
        etl_args=str(control.get(ETL_WS_ETL_ARGS) or "").strip(),
        fqn=str(control.get(ETL_WS_FQN) or "").strip(),
        node_url=str(control.get(ETL_WS_PIPELINE) or ""),
    )


def _going_away_all() -> None:
    for session in list(_SESSIONS):
        session.going_away()


lifecycle.on_stop(_going_away_all)
