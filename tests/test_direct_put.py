"""etl_wsgi.direct_put: the one retry loop, against a real HTTP server (PROTOCOL.md §4.3, §4.4).

Only ``sleep`` is injected (the documented seam): it records the backoff instead of waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from http import HTTPStatus

import pytest
import requests
from requests.adapters import HTTPAdapter

from etl_wsgi.config import Settings
from etl_wsgi.direct_put import (
    NO_HIDDEN_RETRIES,
    Attempt,
    CountingIterator,
    DirectPutResult,
    build_session,
    deliver,
    interpret_response,
    put,
)
from etl_wsgi.errors import (
    DirectPutError,
    DirectPutRefusedError,
    ETLDirectPutTransientError,
    InvalidPipelineError,
    TransformError,
)
from etl_wsgi.handler import _guard_stream
from etl_wsgi.protocol import compose_direct_put_url
from etl_wsgi.transport import ONE_SEND_MAX, OneSendConnection, PlainConnection
from tests.fake_target import (
    SECRET_PATH,
    CloseAfterBody,
    FakeTarget,
    Reply,
    ResetBeforeBody,
    ResetMidBody,
    Stall,
    Truncated,
)
from tests.unit_support import closed_port

BODY = b"HELLO"
TIMEOUT = (5.0, 5.0)


@pytest.fixture
def session() -> Iterator[requests.Session]:
    s = build_session(Settings.from_env({"AIS_TARGET_URL": "http://127.0.0.1:1" + SECRET_PATH}))
    yield s
    s.close()


class Run:
    """One ``deliver()`` call against ``target``: records sleeps, attempts and closes."""

    def __init__(self, session: requests.Session, target: FakeTarget, timeout=TIMEOUT) -> None:
        self.session = session
        self.hop = target.url + "/ais%2F@%23%2Fdst%2Fa.txt?owt=3&uuid=XID1"
        self.url = compose_direct_put_url(self.hop, target.url + SECRET_PATH, "src/a.txt")
        self.timeout = timeout
        self.sleeps: list[float] = []
        self.attempts = 0
        self.closed = 0

    def send(self, url: str, body, headers) -> requests.Response:
        return put(self.session, url, body, headers, self.timeout)  # as ETLServer.client_put

    def buffered(self) -> Attempt:
        self.attempts += 1
        return Attempt(BODY, [self._closed])

    def _closed(self) -> None:
        self.closed += 1

    def __call__(
        self,
        make_attempt: Callable[[], Attempt] | None = None,
        *,
        retries: int = 3,
        replayable: bool = True,
        remaining: str = "",
        url: str | None = None,
    ) -> DirectPutResult:
        return deliver(
            self.send,
            url or self.url,
            self.hop,
            remaining,
            make_attempt or self.buffered,
            retries=retries,
            replayable=replayable,
            sleep=self.sleeps.append,
        )


@pytest.fixture
def run(session: requests.Session, target: FakeTarget) -> Run:
    return Run(session, target)


# --- success -------------------------------------------------------------------------------


def test_success_first_try(run: Run, target: FakeTarget) -> None:
    result = run()
    assert result == DirectPutResult(HTTPStatus.NO_CONTENT, b"", 5)
    assert result.headers == {"Ais-Direct-Put-Length": "5"}
    assert (run.sleeps, run.attempts, run.closed) == ([], 1, 1)
    (put,) = target.puts
    assert put.raw_path == SECRET_PATH + "/ais%2F@%23%2Fdst%2Fa.txt?owt=3&uuid=XID1"
    assert put.body == BODY
    assert put.header("Ais-Node-Url") is None
    assert put.header("Content-Length") == "5"


def test_remaining_pipeline_is_sent_as_header(run: Run, target: FakeTarget) -> None:
    run(remaining="http://127.0.0.1:5002,http://10.0.0.2:9080/x?owt=3")
    (put,) = target.puts
    assert put.header("Ais-Node-Url") == "http://127.0.0.1:5002,http://10.0.0.2:9080/x?owt=3"


# --- transient failures and the backoff ------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [CloseAfterBody(), ResetMidBody(after=1), ResetBeforeBody(), Truncated()],
    ids=lambda b: type(b).__name__,
)
def test_buffered_transient_failures_are_retried_with_full_body(
    run: Run, target: FakeTarget, failure: object
) -> None:
    target.script = [failure, failure, Reply(200)]
    result = run(retries=3)
    assert (result.status, result.delivered) == (204, 5)
    assert run.sleeps == [1.0, 2.0]
    assert (run.attempts, run.closed) == (3, 3)
    puts = target.puts
    assert len(puts) == 3
    assert puts[-1].body == BODY
    if isinstance(failure, CloseAfterBody | Truncated):
        assert all(p.body == BODY for p in puts)


def test_exhausted_retries_answer_502_and_backoff_is_capped(run: Run, target: FakeTarget) -> None:
    target.default = CloseAfterBody()
    with pytest.raises(ETLDirectPutTransientError) as info:
        run(retries=7)
    assert run.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    # exactly retries + 1 requests: the session never re-sends on its own
    assert len(target.puts) == 8
    assert [p.body for p in target.puts] == [BODY] * 8
    assert (run.attempts, run.closed) == (8, 8)
    err = info.value
    assert err.bail_without_local_retry is False
    assert err.status == 502
    assert err.headers == {}
    assert err.url == run.hop
    assert isinstance(err.cause, requests.ConnectionError)
    assert err.message.startswith(f"Direct put failed after retries: direct_put to '{run.hop}'")
    # the cause's text (from requests) holds the full URL; the blueprint redacts the secret
    assert f"'{run.hop}'" in err.message


def test_zero_retries_means_exactly_one_request(run: Run, target: FakeTarget) -> None:
    target.default = ResetMidBody()
    with pytest.raises(ETLDirectPutTransientError) as info:
        run(retries=0)
    assert len(target.puts) == 1
    assert run.sleeps == []
    assert info.value.status == 502


def test_a_default_requests_adapter_would_resend_on_its_own(target: FakeTarget) -> None:
    """Why NO_HIDDEN_RETRIES: with ``max_retries=None`` urllib3 re-sends the PUT 3 more times."""
    target.default = CloseAfterBody()
    with requests.Session() as s:
        s.mount("http://", HTTPAdapter(max_retries=None))
        with pytest.raises(requests.ConnectionError):
            s.put(target.url + "/o", data=BODY, timeout=TIMEOUT)
    assert len(target.puts) == 4
    assert NO_HIDDEN_RETRIES.total == 0


def test_read_timeout_stall_is_retried(session: requests.Session, target: FakeTarget) -> None:
    run = Run(session, target, timeout=(5.0, 0.2))
    target.script = [Stall(), Reply(200)]
    result = run(retries=2)
    assert (result.status, result.delivered) == (204, 5)
    assert run.sleeps == [1.0]
    assert len(target.puts) == 2


def test_non_replayable_input_bails_503_after_one_attempt(run: Run, target: FakeTarget) -> None:
    target.default = CloseAfterBody()
    with pytest.raises(ETLDirectPutTransientError) as info:
        run(retries=3, replayable=False)
    assert len(target.puts) == 1
    assert (run.sleeps, run.attempts, run.closed) == ([], 1, 1)
    err = info.value
    assert err.bail_without_local_retry is True
    assert err.status == 503
    assert err.headers == {"Ais-Etl-Retry-Reason": "direct-put-transient"}
    assert err.message.startswith("Direct put bailed (one-shot body): ")


def test_non_replayable_input_that_succeeds(run: Run, target: FakeTarget) -> None:
    assert run(retries=3, replayable=False).status == 204
    assert len(target.puts) == 1


# --- permanent failures ----------------------------------------------------------------------


def test_refused_is_502_at_once(run: Run) -> None:
    hop_port = closed_port()
    with pytest.raises(DirectPutRefusedError) as info:
        run(retries=3, url=f"http://127.0.0.1:{hop_port}{SECRET_PATH}/o")
    assert (run.sleeps, run.attempts, run.closed) == ([], 1, 1)
    err = info.value
    assert err.status == 502
    assert err.message.startswith(f"direct_put to '{run.hop}' failed: ConnectionError: ")
    assert isinstance(err.__cause__, requests.ConnectionError)


def test_other_send_errors_are_500_without_retry(run: Run) -> None:
    with pytest.raises(DirectPutError) as info:
        run(retries=3, url="ftp://127.0.0.1/x")
    assert info.value.status == 500
    assert "InvalidSchema" in info.value.message
    assert (run.sleeps, run.attempts, run.closed) == ([], 1, 1)


@pytest.mark.parametrize("url", ["http:///no-host", "http://a..b/x", f"http://{'a' * 64}/x"])
def test_url_the_http_client_refuses_is_400_without_retry(run: Run, url: str) -> None:
    """The hop comes from the caller's ``Ais-Node-Url``: a URL urllib3 cannot use is its fault."""
    with pytest.raises(InvalidPipelineError) as info:
        run(retries=3, url=url)
    assert info.value.status == 400
    assert info.value.message.startswith(f"Invalid pipeline header: Pipeline entry {run.hop!r}")
    assert (run.sleeps, run.attempts, run.closed) == ([], 1, 1)


def test_next_hop_error_status_is_a_result_not_a_retry(run: Run, target: FakeTarget) -> None:
    target.script = [Reply(507, b"no space", {"Content-Type": "text/plain"})]
    result = run(retries=3)
    assert result == DirectPutResult(507, b"no space", 0, "text/plain")
    assert result.headers == {}
    assert run.sleeps == []
    assert len(target.puts) == 1


# --- streaming bodies -------------------------------------------------------------------------


def _file_attempts(path, readers: list, fail_after_first: bool = False) -> Callable[[], Attempt]:
    """Like handler._stream_attempt: re-open the input, guard the transform, count its output."""

    def transform(reader) -> Iterator[bytes]:
        while chunk := reader.read(4):
            yield chunk.upper()
            if fail_after_first:
                raise OSError("disk gone")

    def make() -> Attempt:
        reader = open(path, "rb")
        readers.append(reader)
        output = _guard_stream(lambda: transform(reader))
        return Attempt(CountingIterator(output), [output.close, reader.close])

    return make


def test_streaming_replayable_input_is_reopened_per_attempt(
    run: Run, target: FakeTarget, tmp_path
) -> None:
    path = tmp_path / "obj"
    path.write_bytes(b"hello world, " * 1000)
    readers: list = []
    target.script = [ResetMidBody(after=1), Reply(200)]
    result = run(_file_attempts(path, readers), retries=2)
    assert (result.status, result.delivered) == (204, 13000)
    assert run.sleeps == [1.0]
    assert len(readers) == 2
    assert all(r.closed for r in readers)
    last = target.puts[-1]
    assert last.chunked
    assert last.header("Content-Length") is None
    assert last.body == b"HELLO WORLD, " * 1000


def test_transform_error_while_streaming_is_not_retried(
    run: Run, target: FakeTarget, tmp_path
) -> None:
    path = tmp_path / "obj"
    path.write_bytes(b"hello world")
    readers: list = []
    # the target sees the body end early; it then closes quietly (a reply would hit a closed
    # socket and print a traceback from the server thread)
    target.script = [ResetMidBody(after=1 << 20)]
    with pytest.raises(TransformError, match=r"^disk gone$") as info:
        run(_file_attempts(path, readers, fail_after_first=True), retries=3)
    assert isinstance(info.value.__cause__, OSError)
    assert run.sleeps == []
    assert len(readers) == 1
    assert readers[0].closed
    # the aborted PUT reaches the target once; wait for it, so it cannot consume the next
    # test's script from this module-shared target
    (put,) = target.wait_for(1)
    assert put.body.startswith(b"HELL")


# --- Attempt ---------------------------------------------------------------------------------


def test_attempt_sent_and_close_runs_every_closer(caplog) -> None:
    calls: list[str] = []

    def failing() -> None:
        calls.append("failing")
        raise OSError("close failed")

    counting = CountingIterator([b"abc", b"de"])
    attempt = Attempt(counting, [failing, lambda: calls.append("second")])
    assert attempt.sent == 0
    assert list(counting) == [b"abc", b"de"]
    assert attempt.sent == 5
    with caplog.at_level("WARNING", logger="etl_wsgi.direct_put"):
        attempt.close()
    assert calls == ["failing", "second"]
    assert "closing direct-put input failed" in caplog.text
    assert Attempt(b"xyz").sent == 3


# --- interpret_response (§4.3) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "sent", "expected"),
    [
        (Reply(204, headers={"Ais-Direct-Put-Length": "7"}), 5, DirectPutResult(204, b"", 7)),
        (Reply(204), 5, DirectPutResult(204, b"", 0)),
        (Reply(204, headers={"Ais-Direct-Put-Length": "abc"}), 5, DirectPutResult(204, b"", 0)),
        (Reply(204, headers={"Ais-Direct-Put-Length": "-3"}), 5, DirectPutResult(204, b"", 0)),
        (
            Reply(200, b"HELLO!", {"Content-Type": "text/plain"}),
            5,
            DirectPutResult(200, b"HELLO!", 0, "text/plain"),
        ),
        (Reply(200), 5, DirectPutResult(204, b"", 5)),
        (Reply(200), 0, DirectPutResult(204, b"", 0)),
        (
            Reply(507, b"no space", {"Content-Type": "text/plain"}),
            5,
            DirectPutResult(507, b"no space", 0, "text/plain"),
        ),
        (Reply(404, b"nf"), 5, DirectPutResult(404, b"nf", 0)),
        (Reply(503, b"busy"), 5, DirectPutResult(503, b"busy", 0)),
        (Reply(202, b"queued"), 5, DirectPutResult(202, b"queued", 0)),
    ],
)
def test_interpret_response(
    session: requests.Session,
    target: FakeTarget,
    reply: Reply,
    sent: int,
    expected: DirectPutResult,
) -> None:
    target.script = [reply]
    with session.put(target.url + "/o", data=b"x", timeout=TIMEOUT) as resp:
        assert interpret_response(resp, sent) == expected


@pytest.mark.parametrize(
    ("result", "headers"),
    [
        (DirectPutResult(204, delivered=5), {"Ais-Direct-Put-Length": "5"}),
        (DirectPutResult(204, delivered=0), {}),
        (DirectPutResult(200, b"x", delivered=5), {}),
        (DirectPutResult(507, b"x"), {}),
    ],
)
def test_result_headers(result: DirectPutResult, headers: dict[str, str]) -> None:
    assert result.headers == headers


@pytest.mark.parametrize("body", [BODY, b"", "stream"])
def test_put_sends_what_session_put_sends(target: FakeTarget, body) -> None:
    """direct_put.put (ETLServer.client_put) and ``session.put`` put the same request on the
    wire: path, headers (token, length or chunked framing), body; the reply is read whole."""
    settings = Settings.from_env(
        {"AIS_TARGET_URL": target.url + SECRET_PATH, "AIS_AUTHN_TOKEN": "tok3n"}
    )
    url = target.url + "/ais%2F@%23%2Fdst%2Fa%20b.txt?owt=3&uuid=X"
    headers = {"Content-Type": "application/octet-stream"}
    target.default = Reply(200, b"stored")

    def data():
        return CountingIterator(iter([b"ab", b"cd"])) if body == "stream" else body

    with build_session(settings) as session, requests.Session() as stock:
        light = put(session, url, data(), headers, TIMEOUT)
        plain = session.put(url, data=data(), headers=headers, timeout=TIMEOUT)
        stock.headers = session.headers  # requests' own adapter: urllib3 all the way
        reference = stock.put(url, data=data(), headers=headers, timeout=TIMEOUT)
        assert (light.status_code, light.content) == (plain.status_code, plain.content)
        assert (light.status_code, light.content) == (reference.status_code, reference.content)
        assert light.raw.isclosed()  # read whole: the connection is back in the pool
    first = target.requests[0]
    wire = [(r.raw_path, r.headers, r.body, r.chunked) for r in target.requests]
    assert wire[0] == wire[1] == wire[2]
    assert first.header("Authorization") == "Bearer tok3n"
    assert first.body == (b"abcd" if body == "stream" else body)


def test_put_keeps_userinfo_and_a_customised_session(target: FakeTarget) -> None:
    """``user:pw@`` in the hop is basic auth, as with ``session.put``; a session given params
    (or auth, cookies, hooks, proxies, trust_env) goes through ``session.put``."""
    with build_session(Settings.from_env({"AIS_TARGET_URL": target.url + SECRET_PATH})) as s:
        put(s, target.url.replace("//", "//user:pw@") + "/a", BODY, {}, TIMEOUT)
        s.params = {"extra": "1"}
        put(s, target.url + "/b", BODY, {}, TIMEOUT)
    first, second = target.requests
    assert first.header("Authorization") == "Basic dXNlcjpwdw=="
    assert (second.path, second.query) == ("/b", [("extra", "1")])


# --- OneSendConnection: a small body goes out with its header block --------------------------


class RecordingSocket:
    """Stands in for a connected socket: records every sendall."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def settimeout(self, timeout: object) -> None:
        pass


def sends_of(body: object, cls: type = OneSendConnection, **kwargs: object) -> list[bytes]:
    conn = cls("127.0.0.1", 9)
    sock = RecordingSocket()
    conn.sock = sock  # type: ignore[assignment]
    conn.request("PUT", "/v1/o", body=body, headers={"X-A": "1"}, **kwargs)
    return sock.sent


@pytest.mark.parametrize("cls", [OneSendConnection, PlainConnection])
def test_a_small_body_goes_with_its_header_block(cls: type) -> None:
    [sent] = sends_of(b"hello", cls)
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"PUT /v1/o HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 5" in head and b"\r\nX-A: 1" in head
    assert body == b"hello"


def test_other_bodies_go_as_urllib3_sends_them() -> None:
    assert len(sends_of(b"")) == 1  # no body: the header block alone
    big = b"x" * (ONE_SEND_MAX + 1)
    head, body = sends_of(big)
    assert head.endswith(b"\r\n\r\n") and body == big
    chunks = sends_of(iter([b"ab", b"cd"]))  # chunked: urllib3's framing, piece by piece
    assert chunks[1:] == [b"2\r\nab\r\n", b"2\r\ncd\r\n", b"0\r\n\r\n"]


def test_the_session_puts_through_one_send_pools() -> None:
    settings = Settings.from_env({"AIS_TARGET_URL": "http://127.0.0.1:1" + SECRET_PATH})
    with build_session(settings) as session:
        pool = session.get_adapter("http://x").poolmanager.connection_from_url("http://x:1/")
        assert pool.ConnectionCls is OneSendConnection
        tls = session.get_adapter("https://x").poolmanager.connection_from_url("https://x:1/")
        assert tls.ConnectionCls is not OneSendConnection  # TLS pools are urllib3's own
