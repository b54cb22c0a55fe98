"""The request body read straight off gunicorn's socket (etl_wsgi/socket_body.py).

Unit tests build gunicorn's own ``Body``/``LengthReader``/``SocketUnreader`` over a real socket
pair, as its parser does, and check what is left for gunicorn afterwards (the next pipelined
request, the failure flag).  End-to-end tests send HTTP/1.1 requests back to back on one
connection, so bodies arrive together with the next request's bytes.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from gunicorn.http.body import Body, ChunkedReader, LengthReader
from gunicorn.http.unreader import SocketUnreader

from etl_wsgi.const import BODY_UNZEROED_MIN
from etl_wsgi.errors import BadRequestError, IncompleteBodyError
from etl_wsgi.socket_body import SocketBody, socket_body
from etl_wsgi.sources import BodySource, DrainingReader
from tests.conftest import GunicornServer
from tests.e2e_support import MIB, TIMEOUT, booted, split_reply
from tests.fake_target import FakeTarget

NEXT = b"PUT /next HTTP/1.1\r\n"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.settimeout(TIMEOUT)
    right.settimeout(TIMEOUT)
    try:
        yield left, right
    finally:
        left.close()
        right.close()


def gunicorn_body(sock: socket.socket, length: int, read_ahead: bytes = b"") -> Body:
    """What gunicorn's parser hands the app: headers parsed, ``read_ahead`` pushed back."""
    unreader = SocketUnreader(sock)
    if read_ahead:
        unreader.unread(read_ahead)
    return Body(LengthReader(unreader, length))


@contextmanager
def sending(sock: socket.socket, data: bytes, then_close: bool = False) -> Iterator[None]:
    """``sendall(data)`` from a thread: more than a socket pair buffers needs a reader.

    ``then_close``: shut the sending side down after the data (the peer sees the end).
    """

    def send() -> None:
        sock.sendall(data)
        if then_close:
            sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        yield
    finally:
        sender.join(TIMEOUT)
        assert not sender.is_alive()


def environ(body: object) -> dict[str, object]:
    return {"wsgi.input": body}


def test_read_takes_read_ahead_then_the_socket_and_leaves_the_next_request(pair) -> None:
    server, client = pair
    body = gunicorn_body(server, 10, read_ahead=b"0123")
    client.sendall(b"456789" + NEXT)
    raw = socket_body(environ(body))
    assert isinstance(raw, SocketBody)
    assert raw.read(2) == b"01"
    assert raw.read(100) == b"23456789"  # never past the Content-Length
    assert raw.read(100) == b""
    assert body.read() == b""  # gunicorn sees the body consumed
    assert not body.failed
    assert body.reader.unreader.read(len(NEXT)) == NEXT  # the next request is intact


def test_read_ahead_holding_the_next_request_keeps_it_for_gunicorn(pair) -> None:
    server, _ = pair
    body = gunicorn_body(server, 5, read_ahead=b"hello" + NEXT)
    raw = socket_body(environ(body))
    assert raw is not None
    assert raw.read() == b"hello"
    assert body.reader.unreader.read(len(NEXT)) == NEXT


def test_readinto_fills_the_callers_buffer(pair) -> None:
    server, client = pair
    payload = bytes(range(256)) * 4096  # 1 MiB
    body = gunicorn_body(server, len(payload), read_ahead=payload[:100])
    raw = socket_body(environ(body))
    assert raw is not None
    out = bytearray(len(payload) + 10)
    view = memoryview(out)
    got = 0
    with sending(client, payload[100:] + NEXT):
        for _ in range(100_000):  # bounded
            n = raw.readinto(view[got:])
            if not n:
                break
            got += n
    assert got == len(payload)
    assert bytes(out[:got]) == payload
    assert raw.remaining == 0
    assert body.reader.unreader.read(len(NEXT)) == NEXT


def test_a_body_cut_short_is_short_and_marks_the_connection_failed(pair) -> None:
    server, client = pair
    body = gunicorn_body(server, 10, read_ahead=b"01")
    client.sendall(b"234")
    client.shutdown(socket.SHUT_WR)
    raw = socket_body(environ(body))
    assert raw is not None
    assert raw.read() == b"01234"
    assert body.failed  # gunicorn 27 closes the connection instead of parsing the rest


def test_readinto_of_a_cut_body_returns_0_and_marks_failed(pair) -> None:
    server, client = pair
    body = gunicorn_body(server, 10)
    client.shutdown(socket.SHUT_WR)
    raw = socket_body(environ(body))
    assert raw is not None
    assert raw.readinto(bytearray(10)) == 0
    assert body.failed


def test_a_socket_error_marks_failed_and_propagates(pair) -> None:
    server, _ = pair
    server.settimeout(0.05)
    body = gunicorn_body(server, 10)
    raw = socket_body(environ(body))
    assert raw is not None
    with pytest.raises(TimeoutError):
        raw.read(4)
    assert body.failed


@pytest.mark.parametrize(
    "size", [BODY_UNZEROED_MIN - 1, BODY_UNZEROED_MIN, BODY_UNZEROED_MIN + 1, 3 * MIB + 7]
)
def test_both_buffers_hold_exactly_the_body_and_leave_the_next_request(pair, size) -> None:
    """Below ``BODY_UNZEROED_MIN`` a zeroed ``BytesIO``, from it an unzeroed ``bytes``."""
    server, client = pair
    payload = bytes(range(251)) * (size // 251) + b"z" * (size % 251)
    body = gunicorn_body(server, size, read_ahead=payload[:10])
    raw = socket_body(environ(body))
    with sending(client, payload[10:] + NEXT):
        data = BodySource(raw, size).read_all()  # type: ignore[arg-type]
    assert type(data) is bytes and data == payload
    assert raw is not None and raw.remaining == 0 and not body.failed
    assert body.reader.unreader.read() == NEXT  # gunicorn's to parse


@pytest.mark.parametrize("size", [100, BODY_UNZEROED_MIN, 2 * MIB])
def test_a_socket_body_cut_short_is_incomplete_with_either_buffer(pair, size) -> None:
    server, client = pair
    body = gunicorn_body(server, size)
    cut = pytest.raises(IncompleteBodyError, match=f"{size // 2}.*{size}")
    with sending(client, b"y" * (size // 2), then_close=True), cut:
        BodySource(socket_body(environ(body)), size).read_all()  # type: ignore[arg-type]
    assert body.failed


def test_a_socket_error_in_the_unzeroed_buffer_is_a_400_and_marks_failed(pair) -> None:
    server, client = pair
    server.settimeout(0.05)
    body = gunicorn_body(server, 2 * MIB)
    client.sendall(b"y" * 1000)  # then nothing: the receive times out
    with pytest.raises(BadRequestError, match="TimeoutError"):
        BodySource(socket_body(environ(body)), 2 * MIB).read_all()  # type: ignore[arg-type]
    assert body.failed


def test_draining_reader_over_a_socket_body_drains_to_the_next_request(pair) -> None:
    server, client = pair
    body = gunicorn_body(server, 10_000)
    client.sendall(b"a" * 10_000 + NEXT)
    raw = socket_body(environ(body))
    reader = DrainingReader(raw, 10_000)  # type: ignore[arg-type]
    assert reader.read(3) == b"aaa"
    reader.close()
    assert raw is not None and raw.remaining == 0
    assert body.reader.unreader.read(len(NEXT)) == NEXT


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda sock: io.BytesIO(b"abc"), id="not-gunicorn"),
        pytest.param(lambda sock: Body(ChunkedReader(None, SocketUnreader(sock))), id="chunked"),
    ],
)
def test_anything_but_a_fresh_gunicorn_length_body_keeps_wsgi_input(pair, make) -> None:
    assert socket_body(environ(make(pair[0]))) is None
    assert socket_body({}) is None


def test_a_body_the_app_already_read_from_keeps_wsgi_input(pair) -> None:
    server, _ = pair
    body = gunicorn_body(server, 10, read_ahead=b"0123456789")
    body.read(1)  # Body now holds read-ahead of its own
    assert socket_body(environ(body)) is None


# ---- end to end: requests back to back on one connection ---------------------------------------


def back_to_back(server: GunicornServer, bodies: list[bytes]) -> list[tuple[int, bytes]]:
    """All requests in one ``sendall`` (each body arrives with the next request's head)."""
    raw = b"".join(
        b"PUT /src/%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (i, len(b), b)
        for i, b in enumerate(bodies)
    )
    replies: list[tuple[int, bytes]] = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(raw)
        buf = b""
        for _ in range(100_000):  # bounded: ends when every reply is in
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                status, headers, _ = split_reply(buf[: head_end + 4])
                size = int(headers["content-length"]) if "content-length" in headers else None
                if size is None:  # chunked reply
                    end = buf.find(b"\r\n0\r\n\r\n", head_end)
                    if end < 0:
                        break
                    replies.append((status, dechunk(buf[head_end + 4 : end + 7])))
                    buf = buf[end + 7 :]
                    continue
                if len(buf) < head_end + 4 + size:
                    break
                replies.append((status, buf[head_end + 4 : head_end + 4 + size]))
                buf = buf[head_end + 4 + size :]
            if len(replies) == len(bodies):
                break
            data = sock.recv(1 << 20)
            if not data:
                break
            buf += data
    return replies


def dechunk(data: bytes) -> bytes:
    out = b""
    for _ in range(100_000):  # bounded
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            return out
        out += data[:size]
        data = data[size + 2 :]
    raise AssertionError("unterminated chunked reply")


BODIES = [b"first", b"y" * (MIB + 3), b"", b"last"]


@pytest.mark.parametrize(
    ("app", "expect"),
    [
        ("transformers:Upper", [b.upper() for b in BODIES]),
        ("transformers:UpperStream", [b.upper() for b in BODIES]),
        ("transformers:StreamReads3", [b[:3].upper() for b in BODIES]),
    ],
)
def test_back_to_back_requests_on_one_connection(
    module_target: FakeTarget, app: str, expect: list[bytes]
) -> None:
    with booted(app, module_target) as server:
        assert back_to_back(server, BODIES) == [(200, e) for e in expect]


def test_body_source_grows_its_buffer_past_the_prealloc_limit(pair, monkeypatch) -> None:
    """Content-Length is believed only BODY_PREALLOC_MAX ahead of what has arrived."""
    monkeypatch.setattr("etl_wsgi.sources.BODY_PREALLOC_MAX", 1000)
    server, client = pair
    payload = bytes(range(256)) * 14  # 3584 bytes: 4 growth steps
    body = gunicorn_body(server, len(payload), read_ahead=payload[:10])
    raw = socket_body(environ(body))
    with sending(client, payload[10:]):
        assert BodySource(raw, len(payload)).read_all() == payload  # type: ignore[arg-type]
    cut = gunicorn_body(client, 5000)
    server.sendall(b"y" * 2500)
    server.shutdown(socket.SHUT_WR)
    with pytest.raises(IncompleteBodyError, match="2500"):
        BodySource(socket_body(environ(cut)), 5000).read_all()  # type: ignore[arg-type]
