"""etl_wsgi.transport: the session's plain-HTTP path, against real servers on 127.0.0.1.

A buffered plain-HTTP PUT goes over the adapter's own http.client pool; these tests pin what
urllib3 gave before: reuse, liveness checks before reuse, bounded idle pools, the exception
types and chains, decoded replies, cookies for a customised session.
"""

from __future__ import annotations

import gzip
import pickle
import socket
import threading
from collections.abc import Iterator

import pytest
import requests
from requests.adapters import HTTPAdapter

from etl_wsgi.config import Settings
from etl_wsgi.direct_put import NO_HIDDEN_RETRIES, _is_connection_refused, build_session, put
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

    def __init__(self, connections: int, reply: bytes, read_body: bool = True) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        self.accepted = 0
        args = (connections, reply, read_body)
        self.thread = threading.Thread(target=self._serve, args=args, daemon=True)
        self.thread.start()

    def _serve(self, connections: int, reply: bytes, read_body: bool) -> None:
        for _ in range(connections):  # bounded: as many as the test makes
            conn, _ = self.listener.accept()
            self.accepted += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                if read_body:
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    while len(body) < length:
                        body += conn.recv(65536)
                conn.sendall(reply)
            self.closed.set()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


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
        with requests.Session() as stock:
            stock.mount("http://", HTTPAdapter(max_retries=NO_HIDDEN_RETRIES))
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
    with requests.Session() as stock:
        stock.mount("http://", HTTPAdapter(max_retries=NO_HIDDEN_RETRIES))
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
