"""etl_wsgi.handler: the framework-free request flow, called directly (PROTOCOL.md §2-§5).

Inputs are real (files under tmp_path, a FakeTarget on 127.0.0.1); the wire mapping of the
errors raised here is tested through Flask in tests/test_blueprint.py.
"""

from __future__ import annotations

import errno
import io
import logging
from collections.abc import Callable, Iterator

import pytest

from etl_wsgi.base_etl_server import ETLServer
from etl_wsgi.concurrency import MemoryBudgetExceeded
from etl_wsgi.errors import (
    ETLDirectPutTransientError,
    ETLError,
    InvalidPipelineError,
    ObjectNotFoundError,
    StreamCut,
    TransformError,
    UpstreamNetworkError,
    UpstreamStatusError,
)
from etl_wsgi.handler import ClosingBody, Reply, handle, http_source
from etl_wsgi.protocol import ParsedRequest
from tests.fake_target import SECRET_PATH, CloseAfterBody, FakeTarget, Truncated
from tests.fake_target import Reply as FakeReply
from tests.transformers import Inspect, StreamFailFirst, Upper, UpperStream
from tests.unit_support import dst, path_escape


class ReturnsStr(ETLServer):
    def transform(self, data, path, etl_args):
        return "not bytes"


class ReturnsBytearray(ETLServer):
    def transform(self, data, path, etl_args):
        return bytearray(data.upper())


class RaisesETLError(ETLServer):
    def transform(self, data, path, etl_args):
        raise ETLError("bad etl_args", status=400)


class RaisesEmpty(ETLServer):
    def transform(self, data, path, etl_args):
        raise KeyError()


class RecordingStream(ETLServer):
    """Streaming upper-case that remembers its readers; ``fail`` after the first chunk."""

    readers: list = []
    fail = False
    chunk_type: type = bytes

    def transform_stream(self, reader, path, etl_args):
        self.readers.append(reader)
        while chunk := reader.read(4):
            yield type(self).chunk_type(chunk.upper())
            if self.fail:
                raise OSError("disk gone")


@pytest.fixture
def etl_target_url(target: FakeTarget) -> str:
    """``make`` builds ETLs pointed at the module's FakeTarget."""
    return target.url + SECRET_PATH


def call(etl: ETLServer, req: ParsedRequest, body: io.BytesIO) -> Reply:
    """What the blueprint does: select the HTTP source, then handle."""
    return handle(etl, req, http_source(etl, req, body))


def put(path: str = "src/a.txt", **kw: str) -> ParsedRequest:
    return ParsedRequest("PUT", path, **kw)


def collect(reply: Reply) -> bytes:
    assert isinstance(reply.body, ClosingBody)
    try:
        return b"".join(reply.body)
    finally:
        reply.body.close()


# --- buffered ----------------------------------------------------------------------------------


def test_buffered_body(make) -> None:
    reply = call(make(Upper), put(), io.BytesIO(b"hello"))
    assert reply == Reply(200, b"HELLO", {}, "application/octet-stream")


def test_buffered_fqn_wins_over_body(make, obj) -> None:
    reply = call(make(Upper), put(fqn=path_escape(obj)), io.BytesIO(b"ignored"))
    assert reply.body == b"HELLO"


def test_buffered_passes_path_and_args(make, obj) -> None:
    reply = call(make(Inspect), put("src/hello.txt", etl_args="x"), io.BytesIO(b"hi"))
    assert reply.body == b"bytes:hi|src/hello.txt|x"


def test_direct_fqn_passes_the_path_as_str(make, obj) -> None:
    reply = call(make(Inspect, ETL_DIRECT_FQN="true"), put(fqn=path_escape(obj)), io.BytesIO())
    assert reply.body == f"str:{obj}|src/a.txt|".encode()


def test_direct_fqn_without_fqn_passes_bytes(make) -> None:
    reply = call(make(Inspect, ETL_DIRECT_FQN="true"), put(), io.BytesIO(b"b"))
    assert reply.body == b"bytes:b|src/a.txt|"


def test_direct_fqn_still_checks_the_file(make, tmp_path) -> None:
    with pytest.raises(ObjectNotFoundError):
        call(
            make(Inspect, ETL_DIRECT_FQN="1"), put(fqn=path_escape(tmp_path / "gone")), io.BytesIO()
        )


def test_missing_fqn_file(make, tmp_path) -> None:
    with pytest.raises(ObjectNotFoundError, match=r"'src/gone.txt'.*gone.txt'"):
        call(make(Upper), put("src/gone.txt", fqn=path_escape(tmp_path / "gone.txt")), io.BytesIO())


def test_transform_returning_str_is_a_transform_error(make) -> None:
    with pytest.raises(TransformError, match=r"^transform\(\) returned str, expected bytes$"):
        call(make(ReturnsStr), put(), io.BytesIO(b"x"))


def test_transform_returning_bytearray_is_accepted(make) -> None:
    assert call(make(ReturnsBytearray), put(), io.BytesIO(b"ab")).body == b"AB"


def test_transform_exception_becomes_transform_error(make) -> None:
    with pytest.raises(TransformError, match=r"^bad$") as info:
        call(make(Upper), put(), io.BytesIO(b"boom"))
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.status == 500


def test_transform_exception_without_text_is_named(make) -> None:
    with pytest.raises(TransformError, match=r"^KeyError$"):
        call(make(RaisesEmpty), put(), io.BytesIO(b"x"))


def test_user_etl_error_passes_through(make) -> None:
    with pytest.raises(ETLError) as info:
        call(make(RaisesETLError), put(), io.BytesIO(b"x"))
    assert type(info.value) is ETLError
    assert info.value.status == 400


def test_get_without_fqn_fetches_from_the_target(make, target: FakeTarget) -> None:
    target.objects[SECRET_PATH + "/ais%2F@%23%2Fsrc%2Fhello.txt"] = b"hello"
    reply = call(make(Upper), ParsedRequest("GET", "ais/@#/src/hello.txt"), io.BytesIO())
    assert reply.body == b"HELLO"
    (get,) = target.requests
    assert get.raw_path == SECRET_PATH + "/ais%2F@%23%2Fsrc%2Fhello.txt"


def test_get_upstream_error_status(make, target: FakeTarget) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        call(make(Upper), ParsedRequest("GET", "ais/@#/src/none"), io.BytesIO())
    assert info.value.status == 404


def test_get_reserves_memory_budget_before_reading_the_object(make, target: FakeTarget) -> None:
    """hpull: the budget is reserved from the reply's Content-Length, before the body is read
    (PROTOCOL.md §2.6; README "Concurrency and memory").  The object here announces 1000 bytes
    and is cut short: read first, that would be a 502; the budget, held elsewhere, says 503."""
    path = SECRET_PATH + "/ais%2F@%23%2Fsrc%2Fbig"
    target.scripts[path] = [Truncated(declared=1000), Truncated(declared=1000)]
    etl = make(Upper, ETL_MEMORY_BUDGET="2000", ETL_MEMORY_WAIT="0.05")
    elsewhere = etl.memory_budget.acquire(1)  # another request holds one byte
    with pytest.raises(MemoryBudgetExceeded):
        call(etl, ParsedRequest("GET", "ais/@#/src/big"), io.BytesIO())
    assert len(target.requests) == 1  # one GET, closed unread
    etl.memory_budget.release(elsewhere)
    with pytest.raises(UpstreamNetworkError):  # with room, the same object is read: cut short
        call(etl, ParsedRequest("GET", "ais/@#/src/big"), io.BytesIO())
    assert etl.memory_budget.held == 0


# --- streaming ---------------------------------------------------------------------------------


@pytest.fixture
def recording(make) -> Iterator[Callable[..., ETLServer]]:
    def build(fail: bool = False, chunk_type: type = bytes, **env: str) -> ETLServer:
        cls = type(
            "Recording", (RecordingStream,), {"readers": [], "fail": fail, "chunk_type": chunk_type}
        )
        return make(cls, **env)

    yield build


def test_streaming_reply(make, obj) -> None:
    reply = call(make(UpperStream), put(fqn=path_escape(obj)), io.BytesIO())
    assert (reply.status, reply.headers, reply.content_type) == (
        200,
        {},
        "application/octet-stream",
    )
    assert collect(reply) == b"HELLO"


def test_streaming_reply_closes_the_reader(recording, obj) -> None:
    etl = recording()
    reply = call(etl, put(fqn=path_escape(obj)), io.BytesIO())
    (reader,) = etl.readers
    assert not reader.closed
    assert collect(reply) == b"HELLO"
    assert reader.closed


def test_streaming_reply_closes_the_reader_when_never_iterated(recording, obj) -> None:
    etl = recording()
    reply = call(etl, put(fqn=path_escape(obj)), io.BytesIO())
    reply.body.close()  # type: ignore[union-attr]
    assert etl.readers[0].closed


def test_streaming_over_the_request_body(make) -> None:
    body = io.BytesIO(b"abc" * 100_000)
    reply = call(make(UpperStream), put(), body)
    assert collect(reply) == b"ABC" * 100_000


def test_streaming_fails_at_once_before_the_reply(make, obj) -> None:
    with pytest.raises(TransformError, match=r"^bad stream$"):
        call(make(StreamFailFirst), put(fqn=path_escape(obj)), io.BytesIO())


def test_streaming_failure_after_first_chunk_cuts_the_body(recording, obj, caplog) -> None:
    obj.write_bytes(b"hello world")
    etl = recording(fail=True)
    reply = call(etl, put(fqn=path_escape(obj)), io.BytesIO())
    chunks = iter(reply.body)
    assert next(chunks) == b"HELL"
    with (
        caplog.at_level(logging.ERROR, logger=type(etl).__name__),
        pytest.raises(StreamCut, match="disk gone") as cut,
    ):
        next(chunks)
    reply.body.close()  # type: ignore[union-attr]
    assert etl.readers[0].closed
    assert "failed after 4 bytes were sent" in caplog.text
    # the server sees a dropped connection (no second log line), the cause stays attached
    assert isinstance(cut.value, ConnectionResetError)
    assert cut.value.errno == errno.ECONNRESET
    assert isinstance(cut.value.__cause__, TransformError)
    assert [r.path for r in caplog.records] == ["src/a.txt"]  # type: ignore[attr-defined]


def test_streaming_yielding_str_is_a_transform_error(recording, obj) -> None:
    with pytest.raises(TransformError, match=r"yielded str, expected bytes"):
        call(recording(chunk_type=lambda b: b.decode()), put(fqn=path_escape(obj)), io.BytesIO())


def test_streaming_yielding_bytearray_is_accepted(recording, obj) -> None:
    reply = call(recording(chunk_type=bytearray), put(fqn=path_escape(obj)), io.BytesIO())
    assert collect(reply) == b"HELLO"


def test_streaming_missing_file_fails_before_transform(recording, tmp_path) -> None:
    etl = recording()
    with pytest.raises(ObjectNotFoundError):
        call(etl, put(fqn=path_escape(tmp_path / "gone")), io.BytesIO())
    assert etl.readers == []


# --- pipelines / direct put --------------------------------------------------------------------


def test_invalid_pipeline_is_raised_before_any_input(recording, obj) -> None:
    etl = recording()
    with pytest.raises(InvalidPipelineError):
        call(etl, put(fqn=path_escape(obj), node_url="http://a:1,,http://b:2"), io.BytesIO())
    assert etl.readers == []


def test_blank_pipeline_is_no_pipeline(make) -> None:
    assert call(make(Upper), put(node_url="   "), io.BytesIO(b"hello")).body == b"HELLO"


def test_buffered_direct_put(make, target: FakeTarget) -> None:
    reply = call(make(Upper), put(etl_args="q", node_url=dst(target)), io.BytesIO(b"hello"))
    assert reply == Reply(204, b"", {"Ais-Direct-Put-Length": "5"}, None)
    (sent,) = target.puts
    assert sent.raw_path == SECRET_PATH + "/ais%2F@%23%2Fdst%2Fa.txt?owt=3&uuid=XID1&etl_args=q"
    assert sent.body == b"HELLO"
    assert sent.header("Ais-Node-Url") is None


def test_stage_hop_gets_remaining_pipeline(make, target: FakeTarget) -> None:
    target.script = [FakeReply(204, headers={"Ais-Direct-Put-Length": "7"})]
    header = f"{target.url},http://10.0.0.2:9080/x?owt=3"
    reply = call(make(Upper), put(node_url=header), io.BytesIO(b"hello"))
    assert reply == Reply(204, b"", {"Ais-Direct-Put-Length": "7"}, None)
    (sent,) = target.puts
    assert sent.raw_path == "/src/a.txt"
    assert sent.header("Ais-Node-Url") == "http://10.0.0.2:9080/x?owt=3"


def test_last_stage_output_travels_back(make, target: FakeTarget) -> None:
    target.script = [FakeReply(200, b"HELLO!", {"Content-Type": "text/plain"})]
    reply = call(make(Upper), put(node_url=target.url), io.BytesIO(b"hello"))
    assert reply == Reply(200, b"HELLO!", {}, "text/plain")


def test_next_hop_error_passes_through(make, target: FakeTarget) -> None:
    target.script = [FakeReply(507, b"no space")]
    reply = call(make(Upper), put(node_url=dst(target)), io.BytesIO(b"hello"))
    assert (reply.status, reply.body) == (507, b"no space")
    assert reply.content_type == "application/octet-stream"  # the hop sent none


def test_streaming_direct_put_counts_bytes(recording, obj, target: FakeTarget) -> None:
    etl = recording()
    reply = call(etl, put(fqn=path_escape(obj), node_url=dst(target)), io.BytesIO())
    assert reply == Reply(204, b"", {"Ais-Direct-Put-Length": "5"}, None)
    (sent,) = target.puts
    assert sent.chunked
    assert sent.body == b"HELLO"
    assert etl.readers[0].closed


def test_streaming_one_shot_body_bails_503(recording, target: FakeTarget) -> None:
    target.default = CloseAfterBody()
    etl = recording(AIS_DIRECT_PUT_RETRIES="3")
    with pytest.raises(ETLDirectPutTransientError) as info:
        call(etl, put(node_url=dst(target)), io.BytesIO(b"hello"))
    assert info.value.status == 503
    assert info.value.headers == {"Ais-Etl-Retry-Reason": "direct-put-transient"}
    assert len(target.puts) == 1
    assert etl.readers[0].closed


def test_buffered_direct_put_exhausted_is_502(make, target: FakeTarget) -> None:
    target.default = CloseAfterBody()
    etl = make(Upper, AIS_DIRECT_PUT_RETRIES="0")
    with pytest.raises(ETLDirectPutTransientError) as info:
        call(etl, put(node_url=dst(target)), io.BytesIO(b"hello"))
    assert info.value.status == 502
    assert len(target.puts) == 1


# --- ClosingBody ---------------------------------------------------------------------------


def test_closing_body_runs_every_closer_once_even_if_one_raises(caplog) -> None:
    calls: list[str] = []

    def failing() -> None:
        calls.append("failing")
        raise OSError("close failed")

    body = ClosingBody(
        [b"a", b"b"], [lambda: calls.append("first"), failing, lambda: calls.append("last")]
    )
    assert list(body) == [b"a", b"b"]
    with caplog.at_level(logging.WARNING, logger="etl_wsgi.handler"):
        body.close()
    assert calls == ["first", "failing", "last"]
    assert "closing a streamed reply failed" in caplog.text
    body.close()
    assert calls == ["first", "failing", "last"]
