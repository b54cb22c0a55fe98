"""A request body of known length, read straight off gunicorn's socket (hpush, pipeline hops).

gunicorn hands the application ``wsgi.input`` as ``Body`` over ``LengthReader`` over
``SocketUnreader``.  On the way up every byte is written into, sliced out of, and re-joined
from ``BytesIO`` buffers three to five times: py-spy put 47% of a worker's CPU there at 1 MiB
direct put, and most of it when streaming 1 GiB.  :class:`SocketBody` reads the same bytes with
one copy: first what gunicorn already read ahead with the headers, then ``recv_into`` the
caller's buffer (``recv`` for :meth:`SocketBody.read`).

gunicorn's own state stays true, so keep-alive and pipelining work as before:

* ``LengthReader.length`` counts down as bytes are taken, so after the reply gunicorn drains
  exactly what the application left unread, and nothing of the next request;
* bytes gunicorn read ahead *past* the body (a pipelined next request) are handed back to its
  ``Unreader``;
* a failed read or a short body sets ``Body.failed``: gunicorn 27 then closes the connection
  instead of parsing the rest of a body as the next request.

:func:`socket_body` takes this path only when every object is exactly gunicorn's type with the
attributes read here and nothing has been read yet.  Anything else (Werkzeug's development
server, a chunked body, another gunicorn's internals) gets ``None`` and the caller keeps
``wsgi.input``.
"""

from __future__ import annotations

import io
from typing import Any

try:  # gunicorn is a dependency, but the Flask extension may run under another server
    from gunicorn.http.body import Body, LengthReader
    from gunicorn.http.unreader import SocketUnreader
except ImportError:  # pragma: no cover - gunicorn is installed with etl-wsgi
    Body = LengthReader = SocketUnreader = None  # type: ignore[assignment,misc]


class SocketBody:
    """The rest of one request body (``Content-Length``), off the socket with one copy.

    ``read(size)`` returns ``size`` bytes, or fewer only at the end of the body, as gunicorn's
    ``Body.read`` does.  A connection that ends before the body does gives a short result (the
    callers raise :class:`~etl_wsgi.errors.IncompleteBodyError`); an ``OSError`` propagates.
    """

    def __init__(self, body: Any) -> None:
        self._body = body
        self._reader = body.reader
        self._unreader = body.reader.unreader
        self._sock = self._unreader.sock

    @property
    def remaining(self) -> int:
        return int(self._reader.length)

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Up to ``len(buffer)`` bytes of the body into ``buffer``; 0 at its end (or a cut)."""
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._reader.length)
        if want <= 0:
            return 0
        ahead = self._take_read_ahead(want)
        if ahead:
            view[: len(ahead)] = ahead
            got = len(ahead)
        else:
            try:
                got = self._sock.recv_into(view[:want])
            except BaseException:
                self._body.failed = True
                raise
            if not got:
                self._body.failed = True  # the client went away before the end of the body
        self._reader.length -= got
        return got

    def read(self, size: int | None = -1) -> bytes:
        """``size`` bytes (all that is left with ``None`` or a negative size)."""
        left = self._reader.length
        want = left if size is None or size < 0 else min(size, left)
        if want <= 0:
            return b""
        parts = []
        ahead = self._take_read_ahead(want)
        if ahead:
            parts.append(ahead)
        got = len(ahead)
        try:
            while got < want:
                chunk = self._sock.recv(want - got)
                if not chunk:
                    self._body.failed = True  # the client went away before the end of the body
                    break
                parts.append(chunk)
                got += len(chunk)
        except BaseException:
            self._body.failed = True
            raise
        finally:
            self._reader.length -= got
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _take_read_ahead(self, limit: int) -> bytes:
        """What gunicorn read past the headers, at most ``limit`` bytes; the rest stays there."""
        unreader = self._unreader
        if not unreader.buf.seek(0, io.SEEK_END):
            return b""
        data = unreader.buf.getvalue()
        unreader.buf = io.BytesIO()
        if len(data) > limit:
            unreader.buf.write(data[limit:])  # the next request's bytes: gunicorn reads them
            data = data[:limit]
        return data


def socket_body(environ: dict[str, Any]) -> SocketBody | None:
    """A :class:`SocketBody` for this request's body, or ``None`` to keep ``wsgi.input``."""
    body = environ.get("wsgi.input")
    if Body is None or type(body) is not Body:
        return None
    reader = getattr(body, "reader", None)
    if type(reader) is not LengthReader or not isinstance(getattr(reader, "length", None), int):
        return None
    unreader = getattr(reader, "unreader", None)
    if type(unreader) is not SocketUnreader or not hasattr(unreader, "sock"):
        return None
    if not isinstance(getattr(unreader, "buf", None), io.BytesIO):
        return None
    pending = getattr(body, "buf", None)
    if not isinstance(pending, io.BytesIO) or pending.tell():
        return None  # the application already read through Body: its buffer holds bytes
    return SocketBody(body)
