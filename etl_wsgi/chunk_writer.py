"""Chunked reply framing without copying each chunk (streamed replies, PROTOCOL.md §2.7).

gunicorn frames a chunk of a reply without ``Content-Length`` as
``b"".join([size line, chunk, b"\\r\\n"])`` and sends that: every byte of a streamed reply is
copied once more, into a fresh buffer as large as the chunk.  py-spy on a worker streaming
1 GiB (1 MiB chunks) put 39% of its samples on that join, more than on the ``send`` itself.

:func:`write_chunk` puts the same bytes on the wire with one vectored ``sendmsg`` of the three
pieces (the rest with ``sendall`` of views when the socket takes less), and falls back to
gunicorn's own function on TLS sockets, which refuse ``sendmsg``.  :func:`install` makes gunicorn's
``util.write`` use it; the ``post_worker_init`` hook calls it in every worker.
"""

from __future__ import annotations

from typing import Any

_original: Any = None


def write_chunk(sock: Any, data: bytes | str) -> None:
    """Send one chunk of a chunked reply: ``<size hex>\\r\\n<data>\\r\\n``."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    pieces = (b"%X\r\n" % len(data), data, b"\r\n")
    try:
        sent = sock.sendmsg(pieces)
    except NotImplementedError:  # TLS sockets refuse sendmsg before sending anything
        _original(sock, data)
        return
    for piece in pieces:
        if sent >= len(piece):
            sent -= len(piece)
            continue
        sock.sendall(memoryview(piece)[sent:])
        sent = 0


def install() -> None:
    """Route gunicorn's chunk framing through :func:`write_chunk` (idempotent)."""
    global _original
    from gunicorn import util

    if util.write_chunk is write_chunk:
        return
    _original = util.write_chunk
    util.write_chunk = write_chunk
