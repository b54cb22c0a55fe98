"""Where the input bytes of one object come from (PROTOCOL.md §2.2, §2.3, §2.6, §3, §5).

* :class:`FileSource` - ``etl_fqn``: the object's file on the target's (read-only) mount.
* :class:`UpstreamSource` - hpull without ``etl_fqn``: a GET back to the target.
* :class:`BodySource` - hpush / pipeline hop: the request body.

Each source maps its own I/O failures to :mod:`etl_wsgi.errors` at this boundary, so the
request flow never sees an ``OSError`` or a ``requests`` exception from input handling.
A source says whether it can be re-opened (``replayable``): the direct-put retry loop only
retries a streaming put whose input can be produced again (PROTOCOL.md §4.4).
"""

from __future__ import annotations

import io
import logging
import os
import stat
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

import requests
import urllib3

from etl_wsgi.confine import FqnRoots
from etl_wsgi.const import (
    BODY_PREALLOC_MAX,
    BODY_READ_STEP,
    BODY_UNZEROED_MIN,
    DRAIN_CHUNK_BYTES,
)
from etl_wsgi.direct_put import stream_get, tls_error
from etl_wsgi.errors import (
    BadRequestError,
    ETLError,
    FileAccessError,
    IncompleteBodyError,
    ObjectNotFoundError,
    UpstreamNetworkError,
    UpstreamStatusError,
)
from etl_wsgi.protocol import ParsedRequest, sanitize_fqn, upstream_object_url
from etl_wsgi.socket_body import SocketBody

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)


class Source:
    """Input of one object. ``open()`` gives a binary reader the caller must close."""

    replayable = True

    def size_hint(self) -> int | None:
        """Input size when known before reading (memory budget), else ``None``."""
        return None

    def start(self) -> int | None:
        """Get ready to read, as far as that takes no memory; the size when known.

        The buffered flow calls it before it reserves memory budget for the input (then
        :meth:`close` on every path).  Default: :meth:`size_hint`.
        """
        return self.size_hint()

    def close(self) -> None:
        """Let go of what :meth:`start` holds that no reader took over."""

    def read_all(self) -> bytes:
        with self.open() as reader:
            return reader.read()

    def open(self) -> IO[bytes]:  # pragma: no cover - abstract
        raise NotImplementedError


class FileSource(Source):
    """The object file named by ``etl_fqn`` (PROTOCOL.md §3). Re-openable, so replayable.

    With ``roots`` (``ETL_FQN_ROOTS``) every access first resolves the path and checks it is
    inside a root (``403`` otherwise), then uses the *resolved* path, so what is opened is what
    was checked (a symlink swapped in between is a race on the read-only mounts we accept).
    """

    def __init__(self, fqn: str, obj_path: str, roots: FqnRoots | None = None) -> None:
        self.fs_path = sanitize_fqn(fqn)
        self.obj_path = obj_path
        self.roots = roots or FqnRoots()
        self._resolved: str | None = None

    def _allowed_path(self) -> str:
        """Resolved and checked once per request (size hint, open, re-opens for retries)."""
        if self._resolved is None:
            self._resolved = self.roots.resolve(self.fs_path, self.obj_path)
        return self._resolved

    def size_hint(self) -> int | None:
        try:
            return os.stat(self._allowed_path()).st_size
        except (OSError, ValueError, ETLError):
            return None  # open() reports the error properly

    def check(self) -> str:
        """Stat without reading, for ``ETL_DIRECT_FQN`` (transform opens the file itself)."""
        path = self._allowed_path()
        self._guard(os.stat, path)
        if not os.path.isfile(path):
            raise ObjectNotFoundError(self.obj_path, self.fs_path)
        return path

    def open(self) -> IO[bytes]:
        return self._guard(self._open_regular, self._allowed_path())

    def read_all(self) -> bytes:
        with self.open() as reader:
            return self._guard(lambda _: reader.read(), self.fs_path)  # EIO, /proc refusing

    def _open_regular(self, path: str) -> IO[bytes]:
        """Open only a regular file, without blocking on the way.

        ``O_NONBLOCK``: opening a FIFO for reading would otherwise wait for a writer forever;
        a device (``/dev/zero``) would stream without end. Neither is an object (§3).
        """
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FileNotFoundError(path)
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def _guard(self, fn: Callable[[str], object], path: str):  # type: ignore[no-untyped-def]
        try:
            return fn(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFoundError(self.obj_path, self.fs_path) from None
        except PermissionError:
            raise FileAccessError(
                f"Error processing object {self.obj_path!r}: permission denied at {self.fs_path!r}."
            ) from None
        except ValueError as exc:  # embedded NUL byte
            raise BadRequestError(f"Invalid etl_fqn {self.fs_path!r}: {exc}") from None
        except OSError as exc:  # name too long, I/O error...
            raise BadRequestError(
                f"Error processing object {self.obj_path!r}: cannot open {self.fs_path!r}: "
                f"{exc.strerror or exc}"
            ) from None


class UpstreamSource(Source):
    """GET ``AIS_TARGET_URL/<escaped path>`` (§2.6): non-2xx -> same status, network -> 502."""

    def __init__(
        self, session: requests.Session, host_target: str, path: str, timeout: tuple[float, float]
    ) -> None:
        self.session = session
        self.url = upstream_object_url(host_target, path)
        self.peer = urlsplit(host_target).netloc  # for messages: the URL holds the secret
        self.timeout = timeout
        self._started: requests.Response | None = None
        self._length: int | None = None

    def start(self) -> int | None:
        """Send the GET and read the reply's headers; the body stays in the socket until
        :meth:`open` (or :meth:`read_all`) takes this response.

        So the memory budget is reserved from the reply's ``Content-Length`` *before* the body
        is read: with the GET inside ``read_all``, every hpull request of a worker read its
        whole object first and only then waited for budget (wrk, 16 MiB hpull, 256
        connections: the worker held 128 objects at once, past its 2 GiB budget).
        """
        if self._started is None:
            self._started = self._get()
            # urllib3's parse of Content-Length (None when chunked, absent or invalid); nothing
            # is read yet, so what remains is all of it.
            self._length = self._started.raw.length_remaining
        return self._length

    def size_hint(self) -> int | None:
        return self._length

    def close(self) -> None:
        started, self._started = self._started, None
        if started is not None:
            started.close()

    def _get(self) -> requests.Response:
        try:
            resp = stream_get(self.session, self.url, self.timeout)
        except requests.RequestException as exc:
            tls = tls_error(exc, self.peer)
            if tls is not None:
                raise tls from exc
            raise UpstreamNetworkError(f"Network error: {type(exc).__name__}: {exc}") from exc
        if not 200 <= resp.status_code < 300:
            resp.close()
            raise UpstreamStatusError(resp.status_code)
        return resp

    def read_all(self) -> bytes:
        """The whole object in one ``read()``: ``resp.content`` would join 10 KiB pieces.

        Reading to the end hands the connection back to the pool (kept alive); a short body or
        a reset is a 502 (:class:`ResponseReader`).
        """
        with self.open() as reader:
            return reader.read()

    def open(self) -> IO[bytes]:
        """A reader over the started response (:meth:`start`), else over a new GET."""
        started, self._started = self._started, None
        return ResponseReader(started or self._get())  # type: ignore[return-value]


class BodySource(Source):
    """The request body. One-shot: it comes off the socket once, so not replayable (§4.4).

    A body shorter than its ``Content-Length`` (the client went away mid-upload) raises
    :class:`IncompleteBodyError`: gunicorn reports that as a plain EOF, and a truncated object
    must never be transformed and acknowledged as whole.
    """

    replayable = False

    def __init__(self, stream: IO[bytes], content_length: int | None = None) -> None:
        self.stream = stream
        self.content_length = content_length

    def size_hint(self) -> int | None:
        return self.content_length

    def read_all(self) -> bytes:
        try:
            if self.content_length is None:  # chunked: the size is known only at the end
                return self.stream.read()
            return self._read_sized(self.content_length)
        except IncompleteBodyError:
            raise
        except Exception as exc:  # whatever the server's body reader raises (unreadable_body)
            raise unreadable_body(exc) from exc

    def _read_sized(self, size: int) -> bytes:
        """``size`` bytes into one buffer, so the body is in memory once.

        gunicorn's ``Body.read()`` of a whole body grows one ``BytesIO`` 1 MiB at a time, and
        every growth copies what it holds: py-spy put two thirds of a worker's CPU there at
        16 MiB hpush.  ``getvalue()`` of a buffer written to its exact end hands over its bytes
        without another copy.  The client's ``Content-Length`` is only believed
        ``BODY_PREALLOC_MAX`` bytes ahead of what has arrived: the buffer grows by that much at
        a time (glibc moves large blocks with ``mremap``, without copying).
        """
        if isinstance(self.stream, SocketBody):
            return self._receive(self.stream, size)
        out = io.BytesIO()
        if size:
            out.seek(min(size, BODY_PREALLOC_MAX) - 1)
            out.write(b"\0")  # allocate (and zero) the buffer at once
            out.seek(0)
        remaining = size
        while remaining:
            chunk = self.stream.read(min(remaining, BODY_READ_STEP))
            if not chunk:
                raise IncompleteBodyError(size - remaining, size)
            out.write(chunk)
            remaining -= len(chunk)
        return out.getvalue()

    @staticmethod
    def _receive(stream: SocketBody, size: int) -> bytes:
        """Off gunicorn's socket: received straight into the buffer (no chunk in between).

        From ``BODY_UNZEROED_MIN`` up to ``BODY_PREALLOC_MAX`` the buffer is the ``bytes`` that
        ``BufferedReader.read(size)`` allocates: CPython leaves it unzeroed and hands the raw
        stream's ``readinto`` views of it.  Growing a ``BytesIO`` zeroes its new room first:
        ``memset`` was 7% of a worker's CPU at 16 MiB hpush echo (``perf``).
        """
        if BODY_UNZEROED_MIN <= size <= BODY_PREALLOC_MAX:
            with io.BufferedReader(_RawSocketBody(stream), 1) as reader:
                data = reader.read(size)
            if len(data) < size:
                raise IncompleteBodyError(len(data), size)
            return data
        out = io.BytesIO()
        got = 0
        while got < size:
            room = min(size, got + BODY_PREALLOC_MAX)
            out.seek(room - 1)
            out.write(b"\0")  # grow (and zero) up to room
            with out.getbuffer() as view:
                while got < room:
                    received = stream.readinto(view[got:room])
                    if not received:
                        raise IncompleteBodyError(got, size)
                    got += received
        return out.getvalue()

    def open(self) -> IO[bytes]:
        return DrainingReader(self.stream, self.content_length)  # type: ignore[return-value]


class _RawSocketBody(io.RawIOBase):
    """A :class:`SocketBody` as a raw stream, for ``BufferedReader`` (``BodySource._receive``)."""

    def __init__(self, stream: SocketBody) -> None:
        super().__init__()
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self._stream.readinto(buffer)


def unreadable_body(exc: BaseException) -> BadRequestError:
    """The client's body could not be read -> 400.

    The client left mid-chunk (gunicorn ``NoMoreData``, an ``OSError``) or sent broken chunked
    framing (gunicorn ``InvalidChunkSize``, ``ChunkMissingTerminator``: plain ``Exception``
    subclasses, hence the broad catch at both call sites; Werkzeug's server raises others).
    """
    return BadRequestError(f"Request body could not be read: {type(exc).__name__}: {exc}")


def select_source(
    req: ParsedRequest,
    body: IO[bytes],
    *,
    session: requests.Session,
    host_target: str,
    timeout: tuple[float, float],
    content_length: int | None = None,
    fqn_roots: FqnRoots | None = None,
) -> Source:
    """FQN wins over a body (§3); a GET without FQN fetches from the target (§2.6)."""
    if req.fqn:
        return FileSource(req.fqn, req.path, fqn_roots)
    if req.is_get:
        return UpstreamSource(session, host_target, req.path, timeout)
    return BodySource(body, content_length)


class _DelegatingReader(io.RawIOBase):
    """Binary reader over an object with ``read(size)``; subclasses decide what ``close()`` does."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self._inner = inner
        #: Bytes handed to the reader's user (the ``etl_received_bytes`` metric).
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from closed reader")
        data = self._inner.read() if size is None or size < 0 else self._inner.read(size)
        self.bytes_read += len(data)
        return data

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class DrainingReader(_DelegatingReader):
    """Request-body reader that drains what the transform left unread when closed (§5, §9.2 #3).

    A streaming transform may stop reading early; the unread rest of the body would otherwise sit
    on the keep-alive connection in front of the next request.  With ``expected`` (the
    ``Content-Length``), an end of input before that many bytes raises
    :class:`IncompleteBodyError` instead of looking like the end of the object.
    """

    def __init__(self, inner: IO[bytes], expected: int | None = None) -> None:
        super().__init__(inner)
        self._expected = expected
        self._received = 0

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from closed reader")
        try:
            data = super().read(size)
        except Exception as exc:  # see unreadable_body
            raise unreadable_body(exc) from exc
        self._received += len(data)
        whole = size is None or size < 0
        if (
            self._expected is not None
            and self._received < self._expected
            and (whole or (size and not data))
        ):
            raise IncompleteBodyError(self._received, self._expected)
        return data

    def close(self) -> None:
        if self.closed:
            return
        try:
            while True:
                try:
                    chunk = self._inner.read(DRAIN_CHUNK_BYTES)
                except (OSError, ValueError):
                    break
                if not chunk:
                    break
        finally:
            super().close()


class ResponseReader(_DelegatingReader):
    """Reader over a streamed upstream response whose ``close()`` closes the *response*.

    Closing only ``resp.raw`` does not return the connection to the pool (PROTOCOL.md §9.2 #2).
    A failure while reading (reset, read timeout, a body shorter than its ``Content-Length``)
    is an :class:`UpstreamNetworkError` (502, §2.6), whoever reads: the transform's reader must
    not turn the target's failure into a transform error.
    """

    def __init__(self, response: requests.Response) -> None:
        super().__init__(response.raw)  # type: ignore[arg-type]
        self._response = response

    def read(self, size: int | None = -1) -> bytes:
        try:
            return super().read(size)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise UpstreamNetworkError(
                f"Network error: reading the target's reply: {type(exc).__name__}: {exc}"
            ) from exc

    def close(self) -> None:
        if not self.closed:
            try:
                self._response.close()
            finally:
                super().close()
