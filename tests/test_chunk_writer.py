"""Chunk framing by one vectored send (etl_wsgi/chunk_writer.py).

The wire format is checked end to end by the streaming tests (test_e2e_streaming.py, and over
TLS, where the fallback runs, test_tls.py); here: the bytes of one chunk, a socket that takes
only part of a ``sendmsg``, and the TLS fallback.
"""

from __future__ import annotations

import socket
import threading

import gunicorn.util
import pytest

from etl_wsgi import chunk_writer
from tests.e2e_support import TIMEOUT


@pytest.fixture(autouse=True)
def installed():
    original = gunicorn.util.write_chunk
    chunk_writer.install()
    chunk_writer.install()  # idempotent: the original is kept, not our own function
    yield
    gunicorn.util.write_chunk = original


def test_install_routes_gunicorns_chunked_writes() -> None:
    assert gunicorn.util.write_chunk is chunk_writer.write_chunk
    assert chunk_writer._original is not chunk_writer.write_chunk


def read_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    for _ in range(1_000_000):  # bounded
        if len(out) >= n:
            break
        data = sock.recv(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"hello", b"5\r\nhello\r\n"),
        ("h\u00e9", b"3\r\nh\xc3\xa9\r\n"),  # gunicorn encodes str as UTF-8
        (b"x" * 26, b"1A\r\n" + b"x" * 26 + b"\r\n"),
    ],
)
def test_one_chunk_on_the_wire(data: bytes | str, wire: bytes) -> None:
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(TIMEOUT)
        gunicorn.util.write(left, data, chunked=True)
        assert read_exactly(right, len(wire)) == wire


class CountingSocket(socket.socket):
    """Counts the ``sendall`` calls that complete a partial ``sendmsg``."""

    completions = 0

    def sendall(self, data, flags=0):  # type: ignore[no-untyped-def,override]
        self.completions += 1
        return super().sendall(data, flags)


def test_a_partial_sendmsg_is_completed() -> None:
    data = bytes(range(256)) * 8192  # 2 MiB: more than the socket takes at once
    wire = b"200000\r\n" + data + b"\r\n"
    left, right = socket.socketpair()
    with left, right:
        sender = CountingSocket(fileno=left.detach())
        with sender:
            sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            sender.settimeout(TIMEOUT)  # one sendmsg() call takes what fits, as under gevent
            right.settimeout(TIMEOUT)
            received: list[bytes] = []
            reader = threading.Thread(
                target=lambda: received.append(read_exactly(right, len(wire)))
            )
            reader.start()
            chunk_writer.write_chunk(sender, data)
            reader.join(TIMEOUT)
        assert received == [wire]
        assert sender.completions >= 1


class NoSendmsg:
    """A TLS socket's behaviour: ``sendmsg`` refused, ``sendall`` works."""

    def __init__(self) -> None:
        self.sent = b""

    def sendmsg(self, *args: object) -> int:
        raise NotImplementedError("sendmsg not allowed")

    def sendall(self, data: bytes) -> None:
        self.sent += bytes(data)


def test_tls_sockets_fall_back_to_gunicorns_framing() -> None:
    sock = NoSendmsg()
    chunk_writer.write_chunk(sock, b"abc")
    assert sock.sent == b"3\r\nabc\r\n"
