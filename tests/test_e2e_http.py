"""End-to-end HTTP tests: PROTOCOL.md §10 vectors #1-#17 against a real ``gunicorn -k gevent``.

Every request is written with ``http.client`` so the request line goes on the wire exactly as
built here (the doubly escaped ``etl_fqn`` must not be re-encoded), and every answer is checked as
bytes, status and headers.  The fake AIS target records what the ETL sent: URL path and query,
``Ais-Node-Url``, body, chunked or not.  The §10 hosts ``10.0.0.x`` are replaced by fake targets
on 127.0.0.1.

Servers with the default configuration are shared by the module (a boot and a graceful stop cost
about 1.5 s); the shared fake target is reset before each test.  One-off configurations use the
``serve`` fixture of ``conftest.py``.
"""

from __future__ import annotations

import http.client
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import GunicornServer
from tests.e2e_support import booted, connect
from tests.fake_target import (
    SECRET_PATH,
    CloseAfterBody,
    FakeTarget,
    Recorded,
    Reply,
    ResetMidBody,
)
from tests.unit_support import (
    DST_PATH,
    DST_QUERY,
    FQN_Q,
    SECRET,
    closed_port,
    dst,
    fqn_query,
    write_object,
)

#: What the destination target sees of a direct put (PROTOCOL.md §4.2 example).
DST_PUT_PATH = SECRET_PATH + DST_PATH


# ---- helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """One answer as it came off the wire."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes
    elapsed: float

    @property
    def chunked(self) -> bool:
        return self.headers.get("Transfer-Encoding", "").lower() == "chunked"

    def error(self) -> str:
        """The ``{"error": ...}`` message of a JSON error body; the secret must never show."""
        assert self.headers.get("Content-Type") == "application/json", self.headers
        assert SECRET.encode() not in self.body, self.body
        doc = json.loads(self.body)
        assert list(doc) == ["error"], doc
        return doc["error"]


def call(
    server: GunicornServer,
    method: str,
    target: str,
    body: bytes | list[bytes] = b"",
    headers: dict[str, str] | None = None,
) -> Wire:
    """Send ``method target`` (request line taken verbatim) and read the whole answer.

    A list body is sent chunked, one chunk per item, as an upstream streaming stage does.
    """
    conn = connect(server)
    try:
        start = time.monotonic()
        conn.request(
            method,
            target,
            body=body if method == "PUT" else None,
            headers=headers or {},
            encode_chunked=isinstance(body, list),
        )
        resp = conn.getresponse()
        data = resp.read()
        return Wire(resp.status, resp.headers, data, time.monotonic() - start)
    finally:
        conn.close()


def node_url(*hops: str) -> dict[str, str]:
    return {"Ais-Node-Url": ",".join(hops)}


def only_put(target: FakeTarget) -> Recorded:
    """The single request ``target`` received (the ETL answered, so it is already recorded)."""
    assert len(target.requests) == 1, [r.raw_path for r in target.requests]
    rec = target.requests[0]
    assert rec.method == "PUT"
    return rec


def assert_sized(rec: Recorded, body: bytes) -> None:
    """A buffered direct put: ``Content-Length``, not chunked, exact bytes."""
    assert rec.body == body
    assert not rec.chunked
    assert rec.header("Content-Length") == str(len(body))


def assert_delivered(wire: Wire, length: int) -> None:
    """The ETL's "delivered by direct put" answer (§4.3)."""
    assert wire.status == 204, wire.body
    assert wire.body == b""
    assert wire.headers.get("Ais-Direct-Put-Length") == str(length)
    assert wire.headers.get("Ais-Etl-Retry-Reason") is None
    assert wire.headers.get("Content-Type") is None  # nothing to type


def gaps(recs: list[Recorded]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(recs)]


@pytest.fixture
def hello_fqn(tmp_path: Path) -> Path:
    """The §10 object ``/mp1/@ais/src/%ob/hello.txt`` (under ``tmp_path``), content ``hello``."""
    return write_object(tmp_path / "mp1" / "@ais" / "src" / "%ob" / "hello.txt")


# ---- module-scoped servers (default configuration) ---------------------------------------------


@pytest.fixture(scope="module")
def upper_server(module_target: FakeTarget) -> Iterator[GunicornServer]:
    """Buffered ``Upper`` with default settings (``AIS_DIRECT_PUT_RETRIES`` 3)."""
    with booted("transformers:Upper", module_target) as server:
        yield server


@pytest.fixture(scope="module")
def stream_server(module_target: FakeTarget) -> Iterator[GunicornServer]:
    """Streaming ``UpperStream`` with ``AIS_DIRECT_PUT_RETRIES=1`` (§10 #17)."""
    with booted("transformers:UpperStream", module_target, AIS_DIRECT_PUT_RETRIES="1") as server:
        yield server


@pytest.fixture
def upper(upper_server: GunicornServer, target: FakeTarget) -> GunicornServer:
    return upper_server


@pytest.fixture
def stream(stream_server: GunicornServer, target: FakeTarget) -> GunicornServer:
    return stream_server


# ---- §10 #1-#5: health, plain PUT, FQN mode ----------------------------------------------------


def test_fqn_encoder_matches_protocol_example() -> None:
    assert fqn_query("/mp1/@ais/src/%ob/hello.txt") == FQN_Q


def test_v01_health(upper: GunicornServer) -> None:
    wire = call(upper, "GET", "/health")
    assert (wire.status, wire.body) == (200, b"Running")


def test_v02_put_body_buffered(upper: GunicornServer, target: FakeTarget) -> None:
    wire = call(upper, "PUT", "/src/hello.txt", b"hello")
    assert wire.status == 200
    assert wire.headers.get("Content-Type") == "application/octet-stream"
    assert wire.headers.get("Content-Length") == "5"
    assert wire.body == b"HELLO"
    assert target.requests == []


def test_v03_put_fqn_reads_the_file(
    upper: GunicornServer, serve, hello_fqn: Path, target: FakeTarget
) -> None:
    request = f"/src/hello.txt?etl_fqn={fqn_query(hello_fqn)}&etl_args=x"
    wire = call(upper, "PUT", request)
    assert (wire.status, wire.body) == (200, b"HELLO")
    assert wire.headers.get("Content-Length") == "5"
    assert target.requests == []  # no GET back to the target: the file was read

    inspect = serve("transformers:Inspect")
    wire = call(inspect, "PUT", request)
    assert (wire.status, wire.body) == (200, b"bytes:hello|src/hello.txt|x")


def test_v04_direct_fqn_passes_the_path(serve, hello_fqn: Path) -> None:
    request = f"/src/hello.txt?etl_fqn={fqn_query(hello_fqn)}&etl_args=x"
    upper = serve("transformers:Upper", ETL_DIRECT_FQN="true")
    wire = call(upper, "PUT", request)
    assert (wire.status, wire.body) == (200, b"HELLO")

    inspect = serve("transformers:Inspect", ETL_DIRECT_FQN="true")
    wire = call(inspect, "PUT", request)
    assert (wire.status, wire.body) == (200, f"str:{hello_fqn}|src/hello.txt|x".encode())


def test_v05_missing_fqn_is_404(upper: GunicornServer, tmp_path: Path) -> None:
    gone = tmp_path / "mp1" / "gone"
    wire = call(upper, "PUT", f"/src/gone.txt?etl_fqn={fqn_query(gone)}")
    assert wire.status == 404
    message = wire.error()
    assert "src/gone.txt" in message
    assert str(gone) in message


# ---- §10 #6-#7: hpull GET without FQN fetches from the target -----------------------------------


def test_v06_hpull_get_fetches_from_target(upper: GunicornServer, target: FakeTarget) -> None:
    target.objects[SECRET_PATH + "/ais%2F@%23%2Fsrc%2Fhello.txt"] = b"hello"
    wire = call(upper, "GET", "/ais%2F@%23%2Fsrc%2Fhello.txt")
    assert (wire.status, wire.body) == (200, b"HELLO")
    (rec,) = target.requests
    assert rec.method == "GET"
    assert rec.raw_path == SECRET_PATH + "/ais%2F@%23%2Fsrc%2Fhello.txt"


def test_hpull_get_with_fqn_reads_the_file(
    upper: GunicornServer, target: FakeTarget, hello_fqn: Path
) -> None:
    wire = call(upper, "GET", f"/ais%2F@%23%2Fsrc%2Fhello.txt?etl_fqn={fqn_query(hello_fqn)}")
    assert (wire.status, wire.body) == (200, b"HELLO")
    assert target.requests == []


def test_v07_hpull_upstream_404_is_forwarded(upper: GunicornServer, target: FakeTarget) -> None:
    wire = call(upper, "GET", "/ais%2F@%23%2Fsrc%2Fmissing.txt")
    assert wire.status == 404
    assert wire.error() == "Target request failed"
    (rec,) = target.requests
    assert rec.raw_path == SECRET_PATH + "/ais%2F@%23%2Fsrc%2Fmissing.txt"


def test_v07_hpull_upstream_not_listening_is_502(serve) -> None:
    server = serve(
        "transformers:Upper", AIS_TARGET_URL=f"http://127.0.0.1:{closed_port()}{SECRET_PATH}"
    )
    wire = call(server, "GET", "/ais%2F@%23%2Fsrc%2Fhello.txt")
    assert wire.status == 502
    assert wire.error().startswith("Network error: ")  # the URL in it is redacted


# ---- §10 #8-#14: direct put and pipelines (buffered) -------------------------------------------


def test_v08_direct_put_to_destination_target(upper: GunicornServer, target: FakeTarget) -> None:
    wire = call(upper, "PUT", "/src/a.txt?etl_args=q", b"hello", node_url(dst(target)))
    assert_delivered(wire, 5)
    rec = only_put(target)
    assert rec.raw_path == f"{DST_PUT_PATH}?owt=3&uuid=XID1&etl_args=q"
    assert rec.query == [("owt", "3"), ("uuid", "XID1"), ("etl_args", "q")]
    assert rec.header("Ais-Node-Url") is None
    assert_sized(rec, b"HELLO")


def test_v09_next_stage_delivers(upper: GunicornServer, target: FakeTarget) -> None:
    with FakeTarget() as stage:
        stage.default = Reply(204, headers={"Ais-Direct-Put-Length": "7"})
        wire = call(upper, "PUT", "/src/a.txt", b"hello", node_url(stage.url, dst(target)))
        assert_delivered(wire, 7)
        rec = only_put(stage)
    assert rec.raw_path == "/src/a.txt"  # no etl_fqn, no etl_args
    assert rec.header("Ais-Node-Url") == dst(target)
    assert_sized(rec, b"HELLO")
    assert target.requests == []


def test_v10_last_stage_returns_bytes(upper: GunicornServer) -> None:
    with FakeTarget() as stage:
        stage.default = Reply(200, b"HELLO!")
        wire = call(upper, "PUT", "/src/a.txt", b"hello", node_url(stage.url))
        rec = only_put(stage)
    assert (wire.status, wire.body) == (200, b"HELLO!")
    assert wire.headers.get("Ais-Direct-Put-Length") is None
    assert rec.raw_path == "/src/a.txt"
    assert rec.header("Ais-Node-Url") is None
    assert_sized(rec, b"HELLO")


@pytest.mark.parametrize(
    ("status", "body"), [(507, b"no space"), (500, b"internal: disk on fire\n"), (404, b"")]
)
def test_v11_next_hop_error_passes_through(
    upper: GunicornServer, target: FakeTarget, status: int, body: bytes
) -> None:
    target.default = Reply(status, body)
    wire = call(upper, "PUT", "/src/a.txt", b"hello", node_url(dst(target)))
    assert (wire.status, wire.body) == (status, body)
    assert wire.headers.get("Ais-Direct-Put-Length") is None
    assert wire.headers.get("Ais-Etl-Retry-Reason") is None
    assert len(target.puts) == 1  # an answer, however bad, is not retried


def test_v12_empty_pipeline_entry_is_400(upper: GunicornServer, target: FakeTarget) -> None:
    wire = call(upper, "PUT", "/src/a.txt", b"hello", node_url("http://a:1", "", "http://b:2"))
    assert wire.status == 400
    assert wire.error() == "Invalid pipeline header: Pipeline header contains empty entry"
    assert target.requests == []


def test_v13_blank_node_url_is_no_pipeline(upper: GunicornServer, target: FakeTarget) -> None:
    wire = call(upper, "PUT", "/src/a.txt", b"hello", {"Ais-Node-Url": "   "})
    assert (wire.status, wire.body) == (200, b"HELLO")
    assert target.requests == []


def test_v14_transform_error_is_500(upper: GunicornServer) -> None:
    wire = call(upper, "PUT", "/src/a.txt", b"boom")
    assert wire.status == 500
    assert wire.error() == "bad"


# ---- §10 #15-#17: retries -----------------------------------------------------------------------


def test_v15_buffered_direct_put_retries_with_backoff(
    serve, fake_target: FakeTarget, hello_fqn: Path
) -> None:
    server = serve("transformers:Upper", AIS_DIRECT_PUT_RETRIES="2")
    fake_target.script = [CloseAfterBody(), CloseAfterBody()]
    request = f"/src/a.txt?etl_fqn={fqn_query(hello_fqn)}"
    wire = call(server, "PUT", request, headers=node_url(dst(fake_target)))
    assert_delivered(wire, 5)
    puts = fake_target.puts
    assert len(puts) == 3
    for rec in puts:
        assert rec.raw_path == f"{DST_PUT_PATH}?{DST_QUERY}"  # etl_fqn never forwarded
        assert_sized(rec, b"HELLO")
    first, second = gaps(puts)
    assert 0.8 <= first < 1.8
    assert 1.8 <= second < 2.8
    log = server.log()  # retries are logged, and the per-ETL secret is redacted from logs
    assert "attempt 1/3 failed, retrying in 1.0s" in log
    assert "attempt 2/3 failed, retrying in 2.0s" in log
    assert "/v1/etl/_object/etl-upper/***/" in log
    assert "s3cr3tABCD" not in log


def test_v16_streaming_one_shot_body_bails_with_503(
    stream: GunicornServer, target: FakeTarget
) -> None:
    data = b"x" * (4 << 20)
    target.script = [ResetMidBody(after=65536)]
    wire = call(stream, "PUT", "/src/a.txt", data, node_url(dst(target)))
    assert wire.status == 503
    assert wire.headers.get("Ais-Etl-Retry-Reason") == "direct-put-transient"
    assert wire.error().startswith("Direct put bailed (one-shot body): ")
    rec = only_put(target)  # no local retry: the body came off the socket once
    assert rec.chunked
    assert 65536 <= len(rec.body) < len(data)
    assert rec.body == b"X" * len(rec.body)


def test_v17_streaming_fqn_retries_then_502(
    stream: GunicornServer, target: FakeTarget, hello_fqn: Path
) -> None:
    target.default = ResetMidBody(after=1)
    request = f"/src/a.txt?etl_fqn={fqn_query(hello_fqn)}"
    wire = call(stream, "PUT", request, headers=node_url(dst(target)))
    assert wire.status == 502
    assert wire.headers.get("Ais-Etl-Retry-Reason") is None
    assert wire.error().startswith("Direct put failed after retries: ")
    puts = target.puts
    assert len(puts) == 2
    for rec in puts:  # the file was reopened: each attempt sent the whole object
        assert rec.chunked
        assert rec.body == b"HELLO"
    (gap,) = gaps(puts)
    assert 0.8 <= gap < 1.8


# ---- related direct-put and pipeline cases -----------------------------------------------------


def test_direct_put_refused_next_hop_is_502_at_once(upper: GunicornServer) -> None:
    hop = f"http://127.0.0.1:{closed_port()}{DST_PATH}?{DST_QUERY}"
    wire = call(upper, "PUT", "/src/a.txt", b"hello", node_url(hop))
    assert wire.status == 502
    assert wire.headers.get("Ais-Etl-Retry-Reason") is None
    message = wire.error()  # the composed URL holds the secret; the error must not
    assert message.startswith(f"direct_put to {hop!r} failed: ConnectionError: ")
    assert wire.elapsed < 1.0  # not retried: the first backoff alone is 1 s


def test_streaming_direct_put_is_chunked_and_counted(
    stream: GunicornServer, target: FakeTarget
) -> None:
    data = bytes(range(97, 123)) * 10000
    wire = call(stream, "PUT", "/src/a.txt?etl_args=q", data, node_url(dst(target)))
    assert_delivered(wire, len(data))
    rec = only_put(target)
    assert rec.raw_path == f"{DST_PUT_PATH}?{DST_QUERY}&etl_args=q"
    assert rec.chunked
    assert rec.header("Content-Length") is None
    assert rec.body == data.upper()


def test_three_stage_pipeline_first_stage_delivers(
    upper: GunicornServer, target: FakeTarget, hello_fqn: Path
) -> None:
    request = f"/src/hello.txt?etl_fqn={fqn_query(hello_fqn)}&etl_args=q"
    with FakeTarget() as stage1, FakeTarget() as stage2:
        stage1.default = Reply(204, headers={"Ais-Direct-Put-Length": "5"})
        wire = call(upper, "PUT", request, headers=node_url(stage1.url, stage2.url, dst(target)))
        assert_delivered(wire, 5)
        rec = only_put(stage1)
        assert rec.raw_path == "/src/hello.txt?etl_args=q"  # etl_fqn is for the first stage only
        assert rec.header("Ais-Node-Url") == f"{stage2.url},{dst(target)}"
        assert_sized(rec, b"HELLO")
        assert stage2.requests == []
    assert target.requests == []


def test_chunked_put_from_upstream_stage(upper: GunicornServer, target: FakeTarget) -> None:
    """A streaming upstream stage delivers chunked (§5): the hop must accept it and go on."""
    wire = call(upper, "PUT", "/src/a.txt", [b"hel", b"lo"], node_url(dst(target)))
    assert_delivered(wire, 5)
    assert_sized(only_put(target), b"HELLO")


def test_next_stage_204_without_length_omits_header(upper: GunicornServer) -> None:
    with FakeTarget() as stage:
        stage.default = Reply(204)
        wire = call(upper, "PUT", "/src/a.txt", b"hello", node_url(stage.url))
        only_put(stage)
    assert (wire.status, wire.body) == (204, b"")
    assert wire.headers.get("Ais-Direct-Put-Length") is None


def test_etl_args_replace_the_hops_etl_args(upper: GunicornServer, target: FakeTarget) -> None:
    hop = dst(target, "owt=3&etl_args=old&uuid=XID1")
    wire = call(upper, "PUT", "/src/a.txt?etl_args=new%20arg", b"hello", node_url(hop))
    assert_delivered(wire, 5)
    assert only_put(target).query == [("owt", "3"), ("uuid", "XID1"), ("etl_args", "new arg")]

    target.reset()
    wire = call(upper, "PUT", "/src/a.txt", b"hello", node_url(hop))  # no etl_args: hop's kept
    assert_delivered(wire, 5)
    assert only_put(target).raw_path == f"{DST_PUT_PATH}?owt=3&etl_args=old&uuid=XID1"


def test_stage_hop_path_is_escaped(upper: GunicornServer) -> None:
    with FakeTarget() as stage:
        stage.default = Reply(200, b"out")
        wire = call(upper, "PUT", "/src/a%20b%3F@c.txt", b"hello", node_url(stage.url))
        rec = only_put(stage)
    assert (wire.status, wire.body) == (200, b"out")
    assert rec.raw_path == "/src/a%20b%3F@c.txt"
