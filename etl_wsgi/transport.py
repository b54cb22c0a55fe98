"""The worker session's transport: requests' adapter, and how its requests reach the wire.

Most outbound requests are the buffered direct put (PROTOCOL.md §4), a plain-HTTP ``PUT`` of a
``bytes`` body whose whole reply is read before we answer, and the hpull ``GET`` back to the
target (PROTOCOL.md §2.6), whose reply is read through ``Response.raw`` alone.
:class:`SessionAdapter` sends both over its own pool of :mod:`http.client` connections, with
no urllib3 layer between (the ``GET`` through :meth:`SessionAdapter.get_raw`).  Everything
else goes through urllib3 as ``requests`` sends it: TLS, other streamed requests (a user's
``session.get(..., stream=True)``, whose ``iter_content`` decodes), chunked bodies (streaming
direct put) and proxies.

Why: CPU per 1 KiB ``PUT``, timed in one process under gevent: 256 us through requests and
urllib3's pool and response layers, 195-205 us through this adapter (28 us of it urllib3's
liveness check, kept), 82 us for :mod:`http.client` alone.  wrk, direct put with md5, A/B in
one run: 1 KiB 4.78-4.82k -> 6.03-6.15k req/s, 64 KiB 3.83-3.92k -> 4.17-4.72k.  CPU per
1 KiB hpull ``GET`` read whole (``UpstreamSource``), one gevent process against nginx:
341-353 us through urllib3's streamed response, 243-251 us through this adapter, 121-136 us
for :mod:`http.client` alone.

The plain path keeps urllib3's contract where the rest of :mod:`etl_wsgi.direct_put` relies on
it: no retries of its own, a pooled connection is checked for liveness before it is reused
(as urllib3 does), a reply sent before the whole body was read is still read (as urllib3
does), failures raise the ``requests`` exceptions urllib3 would have led to, with
the same chain (a refused connect is ``ConnectionError(MaxRetryError(NewConnectionError))``
caused by ``ConnectionRefusedError``, PROTOCOL.md §9.2 #1), and a compressed reply is decoded.
A streamed reply's ``raw`` reads as urllib3's does under ``requests``: undecoded, a failure
while reading raised as urllib3's ``ProtocolError`` / ``ReadTimeoutError`` (a body shorter
than its ``Content-Length`` too), ``length_remaining``; its connection goes back to the pool
once the body is read to its end, and is closed if the reply is closed before that.
"""

from __future__ import annotations

import errno
import http.client
import io
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.cookies import extract_cookies_to_jar
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    IncompleteRead,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.response import HTTPResponse
from urllib3.util.wait import wait_for_read

#: Largest request body sent in one piece with its header block (a copy of both is made).
ONE_SEND_MAX = 256 << 10

#: Send errors after which the reply is still read, as urllib3 does: the peer closed (reset)
#: after answering early (``EPROTOTYPE``: the same on macOS).
_ANSWERED_EARLY = (errno.ECONNRESET, errno.EPROTOTYPE)


class OneSend:
    """Mixin for an :mod:`http.client`-style connection: a request whose body is a small
    ``bytes`` goes out with its header block in one ``send``.

    Both urllib3 2 and :mod:`http.client` send the header block and the body with two
    ``sendall`` calls: two system calls and, with ``TCP_NODELAY``, two segments the next hop
    wakes up for.  Here the header block is held back and joined to the body.  Chunked and
    larger bodies go as the base class sends them.
    """

    _hold_next = False
    _held: bytes | None = None

    def request(
        self, method: str, url: str, body: Any = None, headers: Any = None, **kwargs: Any
    ) -> None:
        self._hold_next = type(body) is bytes and 0 < len(body) <= ONE_SEND_MAX
        self._held = None
        try:
            super().request(method, url, body=body, headers=headers, **kwargs)  # type: ignore[misc]
            held = self._held
        finally:
            self._hold_next = False
            self._held = None
        if held is not None:  # no body followed after all
            super().send(held)  # type: ignore[misc]

    def send(self, data: Any) -> None:
        if self._hold_next:
            self._hold_next = False
            self._held = bytes(data)
            return
        held = self._held
        if held is not None:
            self._held = None
            data = held + data
        super().send(data)  # type: ignore[misc]


class OneSendConnection(OneSend, HTTPConnection):
    """urllib3's plain-HTTP connection, sending small bodies with their header block."""


class OneSendConnectionPool(HTTPConnectionPool):
    ConnectionCls = OneSendConnection


class PlainConnection(OneSend, http.client.HTTPConnection):
    """The plain path's connection (:mod:`http.client` sets ``TCP_NODELAY`` on connect)."""

    def __str__(self) -> str:  # as urllib3's, quoted in connect errors
        return f"{type(self).__name__}(host={self.host!r}, port={self.port!r})"


class _ReadBody(io.BytesIO):
    """``Response.raw`` of a plain-path reply: its (already read) body, and the
    :mod:`http.client` response that ``requests``' cookie handling looks for."""

    def __init__(self, data: bytes, original: http.client.HTTPResponse) -> None:
        super().__init__(data)
        self._original_response = original

    def isclosed(self) -> bool:
        """As urllib3's ``HTTPResponse.isclosed``: the reply was read whole, the connection
        went back to the pool."""
        return True


class _StreamedBody(io.RawIOBase):
    """``Response.raw`` of a streamed plain-path reply (:meth:`SessionAdapter.get_raw`).

    Reads the body off the connection as urllib3's raw response does under ``requests``
    (undecoded).  Read to its end, the body hands the connection to ``done``
    (:meth:`SessionAdapter._release`); closed before that, or failed, the connection is
    closed: it is mid-reply.
    """

    def __init__(
        self,
        reply: http.client.HTTPResponse,
        conn: PlainConnection,
        done: Callable[[PlainConnection], None],
    ) -> None:
        super().__init__()
        self._reply = reply
        self._conn: PlainConnection | None = conn
        self._done = done
        self._peer = (conn.host, conn.port)
        self._got = 0
        self._original_response = reply  # what requests' cookie handling looks for

    @property
    def length_remaining(self) -> int | None:
        """As urllib3's: the bytes ``Content-Length`` says are still to come; ``None`` when
        chunked or delimited by the close."""
        return self._reply.length

    def readable(self) -> bool:
        return True

    def read(self, amt: int | None = None) -> bytes:
        if self.closed:
            return b""
        reply = self._reply
        try:
            if amt is None or amt < 0:
                data = reply.read()
            else:
                data = reply.read(amt)
                if not data and amt and reply.length:  # http.client says nothing of it
                    raise IncompleteRead(self._got, reply.length)  # as urllib3 does
        except BaseException as exc:
            self.close()
            error = self._as_urllib3_error(exc)
            if error is exc:  # a greenlet killed, ...
                raise
            raise error from exc
        self._got += len(data)
        if reply.isclosed():  # read to its end: http.client let go of it
            self._finish()
        return data

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            conn, self._conn = self._conn, None
            if conn is not None:  # not read to its end
                self._reply.close()
                conn.close()
        finally:
            super().close()

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._done(conn)

    def _as_urllib3_error(self, exc: BaseException) -> BaseException:
        """What urllib3's response raises reading its body (its ``_error_catcher``)."""
        if isinstance(exc, TimeoutError):
            return ReadTimeoutError(HTTPConnectionPool(*self._peer), None, "Read timed out.")  # type: ignore[arg-type]
        if isinstance(exc, (OSError, http.client.HTTPException, ValueError)):
            return ProtocolError(f"Connection broken: {exc!r}", exc)
        return exc


class SessionAdapter(HTTPAdapter):
    """requests' adapter of the worker's session (see the module docstring).

    ``pool_maxsize`` idle connections are kept per host, for the ``pool_connections`` hosts
    used last, on each of the two paths.  ``max_retries`` applies to the urllib3 path only:
    the plain path never retries (:data:`etl_wsgi.direct_put.NO_HIDDEN_RETRIES`).
    """

    def __init__(self, pool_connections: int, pool_maxsize: int, max_retries: Any) -> None:
        self._init_plain_pool()
        super().__init__(
            pool_connections=pool_connections, pool_maxsize=pool_maxsize, max_retries=max_retries
        )

    def _init_plain_pool(self) -> None:
        self._idle: OrderedDict[tuple[str, int], list[PlainConnection]] = OrderedDict()
        self._idle_lock = threading.Lock()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._init_plain_pool()
        super().__setstate__(state)  # type: ignore[misc]

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            **self.poolmanager.pool_classes_by_scheme,
            "http": OneSendConnectionPool,
        }

    def send(  # type: ignore[override]
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        url = request.url
        body = request.body
        if (
            stream
            or proxies
            or not _goes_plain(url, timeout)
            or not (body is None or type(body) is bytes)
        ):
            return super().send(
                request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies
            )
        return self._send_plain(request, url, body, timeout)

    def close(self) -> None:
        super().close()
        with self._idle_lock:
            pools = list(self._idle.values())
            self._idle.clear()
        for idle in pools:
            _close_all(idle)

    # --- the plain path ---------------------------------------------------------------------

    def get_raw(
        self,
        request: requests.PreparedRequest,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
    ) -> requests.Response:
        """Send the ``GET`` ``request`` streamed, for a caller that reads its body through
        ``Response.raw`` only (undecoded, as urllib3's raw reads): the hpull ``GET``
        (:func:`etl_wsgi.direct_put.stream_get`).  Plain HTTP goes over this adapter's
        :mod:`http.client` pool, anything else through :meth:`send`."""
        url = request.url
        if not _goes_plain(url, timeout) or request.body is not None:
            return self.send(
                request, stream=True, timeout=timeout, verify=verify, cert=cert, proxies={}
            )
        key, conn, reply, _ = self._exchange_plain(request, url, None, timeout, read=False)
        body = _StreamedBody(reply, conn, lambda c: self._release(key, c, reply))
        return self._response(request, url, reply, body)

    def _send_plain(
        self, request: requests.PreparedRequest, url: str, body: bytes | None, timeout: Any
    ) -> requests.Response:
        key, conn, reply, data = self._exchange_plain(request, url, body, timeout, read=True)
        self._release(key, conn, reply)
        return self._response(request, url, reply, data)

    def _exchange_plain(
        self,
        request: requests.PreparedRequest,
        url: str,
        body: bytes | None,
        timeout: Any,
        read: bool,
    ) -> tuple[tuple[str, int], PlainConnection, http.client.HTTPResponse, bytes]:
        """``request`` on a pooled (or new) connection: the pool key, the connection, the
        reply, and its whole body if ``read`` (else ``b""``, the body still to read)."""
        parts = urlsplit(url)
        try:
            host, port = parts.hostname, parts.port or http.client.HTTP_PORT
        except ValueError as exc:  # a port out of range or not a number
            raise requests.exceptions.InvalidURL(f"Invalid URL {url!r}: {exc}") from exc
        if not host:
            raise requests.exceptions.InvalidURL(f"Invalid URL {url!r}: no host supplied")
        connect_timeout, read_timeout = (
            timeout if isinstance(timeout, tuple) else (timeout, timeout)
        )
        key = (host, port)
        path = request.path_url
        conn = self._checkout(key)
        if conn is None:
            conn = _connect(host, port, connect_timeout, path)
        try:
            reply = _begin(conn, request.method or "GET", path, body, request.headers, read_timeout)
            data = reply.read() if read else b""
        except BaseException as exc:
            conn.close()
            error = _as_requests_error(exc, request, host, port, path)
            if error is exc:
                raise
            raise error from exc
        return key, conn, reply, data

    def _checkout(self, key: tuple[str, int]) -> PlainConnection | None:
        """The most recently used idle connection to ``key`` that is still open, if any."""
        while True:
            with self._idle_lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
            # as urllib3's is_connection_dropped: readable while idle means closed (or garbage)
            if conn.sock is not None and not wait_for_read(conn.sock, timeout=0.0):
                return conn
            conn.close()

    def _release(
        self, key: tuple[str, int], conn: PlainConnection, reply: http.client.HTTPResponse
    ) -> None:
        """``conn``, its ``reply`` read whole: back to the pool, unless the reply said the
        connection closes (or it did)."""
        if reply.will_close or conn.sock is None:
            conn.close()
        else:
            self._checkin(key, conn)

    def _checkin(self, key: tuple[str, int], conn: PlainConnection) -> None:
        evicted: list[PlainConnection] = []
        with self._idle_lock:
            idle = self._idle.get(key)
            if idle is None:
                idle = self._idle[key] = []
                while len(self._idle) > self._pool_connections:  # type: ignore[attr-defined]
                    evicted.extend(self._idle.popitem(last=False)[1])
            else:
                self._idle.move_to_end(key)
            if len(idle) < self._pool_maxsize:  # type: ignore[attr-defined]
                idle.append(conn)
            else:
                evicted.append(conn)
        _close_all(evicted)

    def _response(
        self,
        request: requests.PreparedRequest,
        url: str,
        reply: http.client.HTTPResponse,
        content: bytes | _StreamedBody,
    ) -> requests.Response:
        """A ``requests.Response`` as ``build_response`` makes it: ``content`` the body
        already read (decoded here), or the reader of a streamed one."""
        headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
        for name, value in reply.msg.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        response = requests.Response()
        if isinstance(content, _StreamedBody):
            response.raw = content
        else:
            data = content
            coding = headers.get("Content-Encoding")
            if coding and coding.lower() != "identity":
                decoded = HTTPResponse(
                    body=io.BytesIO(data), headers=dict(headers), status=reply.status,
                    decode_content=True, preload_content=True,
                )  # fmt: skip
                data = decoded.data
            response.raw = _ReadBody(data, reply)
            response._content = data
            response._content_consumed = True  # type: ignore[attr-defined]
        response.status_code = reply.status
        response.headers = headers
        response.encoding = get_encoding_from_headers(headers)
        response.reason = reply.reason
        response.url = url
        if "Set-Cookie" in headers:
            extract_cookies_to_jar(response.cookies, request, response.raw)
        response.request = request
        response.connection = self
        return response


def _goes_plain(url: object, timeout: Any) -> TypeGuard[str]:
    """Whether a request to ``url`` with ``timeout`` can take the plain path (plain HTTP, a
    timeout :mod:`http.client` understands); the callers add what they need of the body."""
    return (
        isinstance(url, str)
        and url.startswith("http://")
        and (timeout is None or isinstance(timeout, (tuple, int, float)))
    )


def _begin(
    conn: PlainConnection,
    method: str,
    path: str,
    body: bytes | None,
    headers: Any,
    read_timeout: Any,
) -> http.client.HTTPResponse:
    """One request on ``conn``, up to its reply's header block."""
    assert conn.sock is not None
    conn.sock.settimeout(read_timeout)  # sending the body, waiting for the reply, reading it
    try:
        conn.request(method, path, body, headers)
    except OSError as exc:
        # As urllib3: the next hop may answer (413, 401, ...) and close before reading the
        # whole body; its reply is still there to read.
        if not isinstance(exc, BrokenPipeError) and exc.errno not in _ANSWERED_EARLY:
            raise
    return conn.getresponse()


def _as_requests_error(
    exc: BaseException, request: requests.PreparedRequest, host: str, port: int, path: str
) -> BaseException:
    """What ``requests`` raises when urllib3 meets ``exc`` sending ``request`` (to ``path`` on
    ``host:port``) or reading its reply, with no retries left; anything else (a greenlet
    killed, ...) as it is."""
    if isinstance(exc, http.client.InvalidURL):
        return requests.exceptions.InvalidURL(str(exc), request=request)
    if isinstance(exc, TimeoutError):
        timed_out = ReadTimeoutError(None, path, f"Read timed out. ({exc})")  # type: ignore[arg-type]
        return requests.exceptions.ReadTimeout(
            _failure(host, port, path, timed_out), request=request
        )
    if isinstance(exc, (OSError, http.client.HTTPException)):
        aborted = ProtocolError("Connection aborted.", exc)
        return requests.ConnectionError(_failure(host, port, path, aborted), request=request)
    return exc


def _connect(host: str, port: int, timeout: Any, path: str) -> PlainConnection:
    """A new connection, failures raised as ``requests`` raises urllib3's."""
    conn = PlainConnection(host, port, timeout=timeout)
    try:
        conn.connect()
    except UnicodeError as exc:  # a host name IDNA cannot encode: a label empty or too long
        conn.close()
        raise requests.exceptions.InvalidURL(f"Invalid host {host!r}: {exc}") from exc
    except TimeoutError as exc:
        conn.close()
        message = f"Connection to {host} timed out. (connect timeout={timeout})"
        timed_out = ConnectTimeoutError(conn, message)
        raise requests.exceptions.ConnectTimeout(_failure(host, port, path, timed_out)) from exc
    except OSError as exc:
        conn.close()
        if isinstance(exc, socket.gaierror):
            error: NewConnectionError = NameResolutionError(host, conn, exc)  # type: ignore[arg-type]
        else:
            message = f"Failed to establish a new connection: {exc}"
            error = NewConnectionError(conn, message)  # type: ignore[arg-type]
        error.__cause__ = exc
        raise requests.ConnectionError(_failure(host, port, path, error)) from exc
    return conn


def _failure(host: str, port: int, path: str, reason: Exception) -> MaxRetryError:
    """urllib3's error for a request that failed with no retries left: its message names the
    pool (host and port) and ``path`` (redacted before it reaches a log or a reply)."""
    return MaxRetryError(HTTPConnectionPool(host, port), path, reason)


def _close_all(conns: list[PlainConnection]) -> None:
    for conn in conns:
        conn.close()
