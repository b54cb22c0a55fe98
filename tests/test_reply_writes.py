"""Replies with fewer copies and sends (etl_wsgi/reply_writes.py).

The wire format is checked end to end by every e2e test (buffered and streamed replies, and
over TLS, where the fallbacks run, test_tls.py); here: the bytes of one chunk, a sized reply
against gunicorn's own ``Response``, a socket that takes only part of a ``sendmsg``, and the
TLS fallbacks.
"""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import gunicorn.util
import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser

from etl_wsgi import reply_writes
from tests.e2e_support import TIMEOUT

GUNICORN_RESPONSE = wsgi.Response


@pytest.fixture(autouse=True)
def installed():
    original, original_date = gunicorn.util.write_chunk, gunicorn.util.http_date
    reply_writes.install()
    reply_writes.install()  # idempotent: gunicorn's originals are kept, not our own
    yield
    gunicorn.util.write_chunk = original
    gunicorn.util.http_date = original_date
    wsgi.Response = GUNICORN_RESPONSE


def test_install_routes_gunicorns_writes() -> None:
    assert gunicorn.util.write_chunk is reply_writes.write_chunk
    assert reply_writes._original_write_chunk is not reply_writes.write_chunk
    assert gunicorn.util.http_date is reply_writes.http_date
    assert reply_writes._original_http_date is not reply_writes.http_date
    assert wsgi.Response.__bases__ == (GUNICORN_RESPONSE,)


def test_date_header_is_gunicorns_formatted_once_a_second(monkeypatch) -> None:
    gunicorns = reply_writes._original_http_date
    calls: list[float] = []

    def counted(timestamp=None):
        calls.append(timestamp)
        return gunicorns(timestamp)

    now = [1_700_000_000.25]
    monkeypatch.setattr(reply_writes, "_original_http_date", counted)
    monkeypatch.setattr(reply_writes, "_date_cache", (-1, ""))
    monkeypatch.setattr(reply_writes, "time", SimpleNamespace(time=lambda: now[0]))
    first = gunicorn.util.http_date()
    assert first == "Tue, 14 Nov 2023 22:13:20 GMT" == gunicorns(now[0])
    now[0] += 0.7  # the same second
    assert gunicorn.util.http_date() == first
    now[0] += 0.1  # the next one
    assert gunicorn.util.http_date() == "Tue, 14 Nov 2023 22:13:21 GMT"
    assert calls == [1_700_000_000, 1_700_000_001]
    assert gunicorn.util.http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"  # explicit: as is


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
            reply_writes.write_chunk(sender, data)
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
    reply_writes.write_chunk(sock, b"abc")
    assert sock.sent == b"3\r\nabc\r\n"


class Recording:
    """A socket stand-in recording each call: ``sendmsg`` takes at most ``take`` bytes."""

    def __init__(self, take: int = 1 << 30, tls: bool = False) -> None:
        self.take = take
        self.tls = tls
        self.calls: list[tuple[str, bytes]] = []

    def sendmsg(self, pieces) -> int:  # type: ignore[no-untyped-def]
        if self.tls:
            raise NotImplementedError("sendmsg not allowed")
        data = b"".join(bytes(p) for p in pieces)[: self.take]
        self.calls.append(("sendmsg", data))
        return len(data)

    def sendall(self, data) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("sendall", bytes(data)))

    @property
    def wire(self) -> bytes:
        return b"".join(data for _, data in self.calls)


def reply_on(response_class: type, sock: Recording, body: bytes, *, sized: bool = True) -> bytes:
    """One ``PUT`` answered through ``response_class`` as gunicorn's worker does; the wire."""
    cfg = Config()
    req = next(RequestParser(cfg, [b"PUT /o HTTP/1.1\r\nHost: x\r\n\r\n"], ("127.0.0.1", 1)))
    resp = response_class(req, sock, cfg)
    headers = [("Content-Type", "application/octet-stream")]
    if sized:
        headers.append(("Content-Length", str(len(body))))
    resp.start_response("200 OK", headers)
    resp.write(body)
    resp.close()
    head, _, rest = sock.wire.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.startswith(b"Date: ")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + rest


@pytest.mark.parametrize("body", [b"x", b"hello world" * 1000])
def test_a_sized_reply_is_gunicorns_bytes_in_one_send(body: bytes) -> None:
    ours, theirs = Recording(), Recording()
    assert reply_on(wsgi.Response, ours, body) == reply_on(GUNICORN_RESPONSE, theirs, body)
    assert [kind for kind, _ in ours.calls] == ["sendmsg"]
    assert [kind for kind, _ in theirs.calls] == ["sendall", "sendall"]


def test_a_sized_reply_the_socket_takes_in_part_is_completed() -> None:
    body = b"y" * 5000
    ours, theirs = Recording(take=50), Recording()  # part of the header block
    assert reply_on(wsgi.Response, ours, body) == reply_on(GUNICORN_RESPONSE, theirs, body)
    assert [kind for kind, _ in ours.calls] == ["sendmsg", "sendall", "sendall"]
    assert len(ours.calls[0][1]) == 50
    assert ours.calls[2][1] == body


def test_a_sized_reply_over_tls_is_sent_as_gunicorn_does() -> None:
    ours, theirs = Recording(tls=True), Recording()
    assert reply_on(wsgi.Response, ours, b"abc") == reply_on(GUNICORN_RESPONSE, theirs, b"abc")
    assert [kind for kind, _ in ours.calls] == ["sendall", "sendall"]


def test_other_replies_keep_gunicorns_writes() -> None:
    """Chunked (no Content-Length) and empty bodies: headers first, as before."""
    for body, sized in ((b"abc", False), (b"", True)):
        ours, theirs = Recording(), Recording()
        got = reply_on(wsgi.Response, ours, body, sized=sized)
        assert got == reply_on(GUNICORN_RESPONSE, theirs, body, sized=sized)
        assert ours.calls[0][0] == "sendall"  # the header block on its own
