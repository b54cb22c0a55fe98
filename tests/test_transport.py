"""etl_wsgi.transport: the session's plain-HTTP path, against real servers on 127.0.0.1.

A buffered plain-HTTP PUT and the hpull GET (streamed, read through ``raw``) go over the
adapter's own http.client pool; these tests pin what urllib3 gave before: reuse, liveness
checks before reuse, bounded idle pools, the exception types, chains and messages, decoded
(PUT) or raw (GET) replies, cookies for a customised session.
"""

from __future__ import annotations

import gzip
import pickle
import socket
import threading
from collections.abc import Iterator

import pytest
import requests
from gevent import GreenletExit
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from etl_wsgi.config import Settings
from etl_wsgi.direct_put import (
    NO_HIDDEN_RETRIES,
    _is_connection_refused,
    build_session,
    put,
    stream_get,
)
from etl_wsgi.transport import PlainConnection, SessionAdapter
from tests.fake_target import (
    SECRET_PATH,
    CloseAfterBody,
    FakeTarget,
    Reply,
    ResetBeforeBody,
    blackhole,
)
from tests.unit_support import closed_port

TIMEOUT = (5.0, 5.0)


@pytest.fixture
def target() -> Iterator[FakeTarget]:
    with FakeTarget() as t:
        yield t


@pytest.fixture
def session(target: FakeTarget) -> Iterator[requests.Session]:
    with build_session(Settings.from_env({"AIS_TARGET_URL": target.url + SECRET_PATH})) as s:
        yield s


def _stock() -> requests.Session:
    """requests as it comes, urllib3 under it, with our no-retry policy: the reference."""
    stock = requests.Session()
    stock.mount("http://", HTTPAdapter(max_retries=NO_HIDDEN_RETRIES))
    return stock


def test_buffered_puts_share_one_kept_alive_connection(session, target: FakeTarget) -> None:
    for i in range(5):
        resp = put(session, f"{target.url}/o{i}", b"x" * i, {}, TIMEOUT)
        assert resp.status_code == 200
    assert [r.body for r in target.requests] == [b"x" * i for i in range(5)]
    assert len({r.peer_port for r in target.requests}) == 1


def test_a_reply_that_closes_is_not_pooled(session, target: FakeTarget) -> None:
    target.script = [Reply(200, b"a", {"Connection": "close"})]
    assert put(session, target.url + "/a", b"1", {}, TIMEOUT).content == b"a"
    assert put(session, target.url + "/b", b"2", {}, TIMEOUT).status_code == 200
    first, second = target.requests
    assert first.peer_port != second.peer_port


class OneRequestPerConnection:
    """A raw server: on each of ``connections`` connections it reads one request's header
    block (and its body, if ``read_body``), sends ``reply`` as it is, and closes.  ``closed``
    is set once the server side closed a connection; ``accepted`` counts connections."""

    def __init__(
        self, connections: int, reply: bytes, read_body: bool = True, hold: bool = False
    ) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        self.port = self.listener.getsockname()[1]
        #: with ``hold``, each connection stays open after the reply until :meth:`close`
        self.hold = hold
        self.held: list[socket.socket] = []
        self.accepted = 0
        args = (connections, reply, read_body)
        self.thread = threading.Thread(target=self._serve, args=args, daemon=True)
        self.thread.start()

    def _serve(self, connections: int, reply: bytes, read_body: bool) -> None:
        for _ in range(connections):  # bounded: as many as the test makes
            conn, _ = self.listener.accept()
            self.accepted += 1
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            if read_body:
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += conn.recv(65536)
            conn.sendall(reply)
            if self.hold:
                self.held.append(conn)
            else:
                conn.close()
                self.closed.set()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)
        for conn in self.held:
            conn.close()


#: Keep-alive announced, then the connection closed: the idle pooled connection a target dropped.
OK_THEN_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
#: Sent after the header block alone: a target refusing a body before reading it (the rest of
#: the body meets a reset).
EARLY_413 = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 7\r\nConnection: close\r\n\r\ntoo big"
)


def test_an_early_reply_is_read_as_urllib3_reads_it(session) -> None:
    """The send of the body fails (broken pipe or reset); the reply is there all the same."""
    server = OneRequestPerConnection(6, EARLY_413, read_body=False)
    body = b"x" * (8 << 20)  # far more than the socket buffers take
    try:
        with _stock() as stock:
            for _ in range(3):
                theirs = stock.put(server.url + "/a", data=body, timeout=TIMEOUT)
                ours = put(session, server.url + "/a", body, {}, TIMEOUT)
                assert (ours.status_code, ours.content) == (413, b"too big")
                assert (theirs.status_code, theirs.content) == (413, b"too big")
    finally:
        server.close()


def test_an_idle_connection_the_target_closed_is_not_reused(session) -> None:
    """Without urllib3's liveness check the second PUT would go out on the dead socket and
    fail (RemoteDisconnected); with it, a new connection is made and the PUT succeeds."""
    server = OneRequestPerConnection(2, OK_THEN_CLOSE)
    try:
        assert put(session, server.url + "/a", b"1", {}, TIMEOUT).content == b"ok"
        assert server.closed.wait(5)
        assert put(session, server.url + "/b", b"2", {}, TIMEOUT).content == b"ok"
        assert server.accepted == 2
    finally:
        server.close()


def test_a_failed_reused_connection_is_dropped(session, target: FakeTarget) -> None:
    target.script = [Reply(200), ResetBeforeBody()]
    put(session, target.url + "/a", b"1", {}, TIMEOUT)
    with pytest.raises(requests.ConnectionError):
        put(session, target.url + "/b", b"2", {}, TIMEOUT)
    assert put(session, target.url + "/c", b"3", {}, TIMEOUT).status_code == 200
    ports = [r.peer_port for r in target.requests]
    assert ports[0] == ports[1] != ports[2]


def test_refused_keeps_urllib3s_exception_chain() -> None:
    settings = Settings.from_env({"AIS_TARGET_URL": "http://127.0.0.1:1" + SECRET_PATH})
    with build_session(settings) as s, pytest.raises(requests.ConnectionError) as info:
        put(s, f"http://127.0.0.1:{closed_port()}/x", b"x", {}, TIMEOUT)
    assert _is_connection_refused(info.value)


def test_connect_timeout_is_connect_timeout(session) -> None:
    with blackhole() as url, pytest.raises(requests.exceptions.ConnectTimeout):
        put(session, url + "/x", b"x", {}, (0.2, 5.0))


def test_idle_connections_are_bounded_per_host_and_in_hosts() -> None:
    adapter = SessionAdapter(pool_connections=2, pool_maxsize=2, max_retries=NO_HIDDEN_RETRIES)
    with FakeTarget() as t:
        conns = [PlainConnection("127.0.0.1", t.port) for _ in range(5)]
        for conn in conns:
            conn.connect()
        for conn in conns[:3]:
            adapter._checkin(("a", 1), conn)
        assert [c.sock is None for c in conns[:3]] == [False, False, True]  # third closed
        adapter._checkin(("b", 1), conns[3])
        adapter._checkin(("c", 1), conns[4])  # a third host: "a", used least recently, goes
        assert conns[0].sock is None and conns[1].sock is None
        assert conns[3].sock is not None and conns[4].sock is not None
        adapter.close()
        assert conns[3].sock is None and conns[4].sock is None


def test_a_compressed_reply_is_decoded_as_requests_does(session, target: FakeTarget) -> None:
    target.default = Reply(200, gzip.compress(b"hello"), {"Content-Encoding": "gzip"})
    assert put(session, target.url + "/a", b"x", {}, TIMEOUT).content == b"hello"
    with requests.Session() as stock:
        assert stock.put(target.url + "/b", data=b"x", timeout=TIMEOUT).content == b"hello"


def test_a_customised_session_keeps_cookies(session, target: FakeTarget) -> None:
    session.cookies.set("seen", "1")  # customised: put() goes through Session.request
    target.default = Reply(200, b"", {"Set-Cookie": "token=abc; Path=/"})
    put(session, target.url + "/a", b"x", {}, TIMEOUT)
    put(session, target.url + "/b", b"x", {}, TIMEOUT)
    assert session.cookies.get("token") == "abc"
    assert target.requests[1].header("Cookie") == "seen=1; token=abc"


def test_the_adapter_survives_pickling(target: FakeTarget) -> None:
    adapter = SessionAdapter(pool_connections=2, pool_maxsize=2, max_retries=NO_HIDDEN_RETRIES)
    copy = pickle.loads(pickle.dumps(adapter))
    with requests.Session() as s:
        s.mount("http://", copy)
        assert s.put(target.url + "/a", data=b"x", timeout=TIMEOUT).status_code == 200
    copy.close()


@pytest.mark.parametrize("behaviour", [CloseAfterBody(), ResetBeforeBody(), "refused"])
def test_failures_read_as_urllib3s(session, target: FakeTarget, behaviour) -> None:
    """Same exception type and message as through urllib3 with the same no-retry policy:
    pool, path and cause, which the redacted logs and 502 bodies quote."""
    url = (
        f"http://127.0.0.1:{closed_port()}/a?x=1"
        if behaviour == "refused"
        else target.url + "/a?x=1"
    )
    errors = []
    with _stock() as stock:
        for send in (lambda: put(session, url, b"x", {}, TIMEOUT), lambda: stock.put(url, b"x")):
            target.script = [] if behaviour == "refused" else [behaviour]
            with pytest.raises(requests.ConnectionError) as info:
                send()
            errors.append(info.value)
    ours, theirs = (str(e) for e in errors)
    theirs_cause = type(errors[1].args[0].reason)
    assert type(errors[0]) is type(errors[1]) and type(errors[0].args[0].reason) is theirs_cause
    ours = ours.replace("PlainConnection(", "HTTPConnection(")  # the connection's class name
    if isinstance(behaviour, ResetBeforeBody):  # when the reset lands varies: up to the cause
        ours, theirs = (s.split("'Connection aborted.', ")[0] for s in (ours, theirs))
    assert ours == theirs
    assert "Max retries exceeded with url: /a?x=1" in ours


# --- the hpull GET: streamed over the same pool, read through ``raw`` -------------------------


def test_streamed_gets_share_one_kept_alive_connection(session, target: FakeTarget) -> None:
    target.objects["/o"] = body = bytes(range(256)) * 400
    for _ in range(3):
        resp = stream_get(session, target.url + "/o", TIMEOUT)
        assert resp.raw.length_remaining == len(body)
        assert resp.raw.read(10) + resp.raw.read(1 << 20) == body
        assert resp.raw.length_remaining == 0
        resp.close()
    assert len({r.peer_port for r in target.requests}) == 1
    assert not session.get_adapter(target.url).poolmanager.pools.keys()  # urllib3 unused


def test_a_streamed_get_closed_mid_body_is_not_reused(session, target: FakeTarget) -> None:
    target.objects["/o"] = b"x" * 200_000
    resp = stream_get(session, target.url + "/o", TIMEOUT)
    assert resp.raw.read(10) == b"x" * 10
    resp.close()
    assert resp.raw.closed and resp.raw.read(10) == b""
    resp = stream_get(session, target.url + "/o", TIMEOUT)
    assert resp.raw.read() == b"x" * 200_000
    resp.close()
    first, second = target.requests
    assert first.peer_port != second.peer_port


def test_a_streamed_reply_that_closes_is_not_pooled(session, target: FakeTarget) -> None:
    target.scripts["/o"] = [Reply(200, b"a", {"Connection": "close"}), Reply(200, b"b")]
    assert stream_get(session, target.url + "/o", TIMEOUT).raw.read() == b"a"
    assert stream_get(session, target.url + "/o", TIMEOUT).raw.read() == b"b"
    first, second = target.requests
    assert first.peer_port != second.peer_port


def test_a_streamed_get_goes_out_as_urllib3_sends_it(session, target: FakeTarget) -> None:
    target.objects["/o"] = b"hello"
    with _stock() as stock:
        stock.headers = session.headers
        stock.get(target.url + "/o", stream=True, timeout=TIMEOUT).close()
    stream_get(session, target.url + "/o", TIMEOUT).close()
    theirs, ours = target.requests
    assert (ours.method, ours.raw_path, ours.headers) == ("GET", "/o", theirs.headers)


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
GZIPPED = gzip.compress(b"hello")
GZIP_REPLY = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
    len(GZIPPED),
    GZIPPED,
)


def _ours_then_theirs(
    session: requests.Session, reply: bytes, timeout: tuple[float, float], hold: bool = False
) -> Iterator[requests.Response]:
    """A streamed GET answered with ``reply`` (a raw server's bytes): through ``stream_get``,
    then through stock requests; each closed once the caller is done with it."""
    server = OneRequestPerConnection(2, reply, read_body=False, hold=hold)
    try:
        with _stock() as stock:
            for get in (
                lambda: stream_get(session, server.url, timeout),
                lambda: stock.get(server.url, stream=True, timeout=timeout),
            ):
                resp = get()
                try:
                    yield resp
                finally:
                    resp.close()
    finally:
        server.close()


@pytest.mark.parametrize(("reply", "body"), [(CHUNKED, b"hello"), (GZIP_REPLY, GZIPPED)])
def test_a_streamed_reply_reads_as_urllib3s_raw(session, reply: bytes, body: bytes) -> None:
    """De-chunked, not decoded (``requests`` decodes in ``iter_content``, not in ``raw``)."""
    for resp in _ours_then_theirs(session, reply, TIMEOUT):
        assert resp.raw.length_remaining == (None if reply is CHUNKED else len(body))
        assert resp.raw.read() == body


TRUNCATED = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nshort"
BAD_CHUNK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"


@pytest.mark.parametrize("whole", [True, False], ids=["read()", "read(n)"])
@pytest.mark.parametrize(
    ("reply", "hold"),
    [(TRUNCATED, False), (BAD_CHUNK, False), (TRUNCATED, True)],
    ids=["truncated", "bad-chunk", "read-timeout"],
)
def test_streamed_read_failures_read_as_urllib3s(
    session, reply: bytes, hold: bool, whole: bool
) -> None:
    """A reply cut short, broken framing, a target that stops sending: the same exception
    type and message from ``raw.read`` as urllib3's (the 502's text, PROTOCOL.md §2.6)."""
    errors = []
    for resp in _ours_then_theirs(session, reply, (5.0, 0.3), hold):
        with pytest.raises(Exception) as info:
            for _ in range(5):  # bounded: the failure comes on the first or second read
                resp.raw.read() if whole else resp.raw.read(100)
        errors.append(info.value)
    ours, theirs = errors
    assert (type(ours), str(ours)) == (type(theirs), str(theirs))
    assert isinstance(ours, (ProtocolError, ReadTimeoutError))
    assert not any(session.get_adapter("http://127.0.0.1")._idle.values())  # not pooled


def test_a_refused_streamed_get_keeps_urllib3s_exception_chain(session) -> None:
    with pytest.raises(requests.ConnectionError) as info:
        stream_get(session, f"http://127.0.0.1:{closed_port()}/x", TIMEOUT)
    assert _is_connection_refused(info.value)


def test_a_streamed_get_through_another_adapter_is_sent_by_it(target: FakeTarget) -> None:
    """A user who mounts their own adapter keeps it for the hpull GET."""
    target.objects["/o"] = b"hello"
    with build_session(Settings.from_env({"AIS_TARGET_URL": target.url})) as s:
        mine = HTTPAdapter(max_retries=NO_HIDDEN_RETRIES)
        s.mount("http://", mine)
        resp = stream_get(s, target.url + "/o", TIMEOUT)
        assert resp.connection is mine and resp.raw.read() == b"hello"
        resp.close()


def test_a_killed_read_closes_the_streamed_reply_and_raises_as_it_is(
    session, target: FakeTarget
) -> None:
    """A greenlet killed mid-read (``GreenletExit``) is not turned into a network error."""
    target.objects["/o"] = b"x" * 100_000
    resp = stream_get(session, target.url + "/o", TIMEOUT)

    def killed(*args: object) -> bytes:
        raise GreenletExit

    resp.raw._reply.read = killed
    with pytest.raises(GreenletExit) as info:
        resp.raw.read(10)
    assert info.value.__cause__ is None
    assert resp.raw.closed
    assert not any(session.get_adapter(target.url)._idle.values())
