"""etl_wsgi.sources: FQN file, upstream GET, request body (PROTOCOL.md §2.6, §3, §5)."""

from __future__ import annotations

import io
import os
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from etl_wsgi.config import Settings
from etl_wsgi.const import DRAIN_CHUNK_BYTES
from etl_wsgi.direct_put import build_session, stream_get
from etl_wsgi.errors import (
    BadRequestError,
    FileAccessError,
    IncompleteBodyError,
    ObjectNotFoundError,
    UpstreamNetworkError,
    UpstreamStatusError,
)
from etl_wsgi.protocol import ParsedRequest
from etl_wsgi.sources import (
    BodySource,
    DrainingReader,
    FileSource,
    ResponseReader,
    UpstreamSource,
    select_source,
)
from etl_wsgi.transport import SessionAdapter
from tests.fake_target import SECRET_PATH, FakeTarget, Reply, Truncated
from tests.unit_support import closed_port, path_escape, write_object

TIMEOUT = (5.0, 5.0)
UNAME = "ais/@#/src/hello.txt"
ESCAPED = "ais%2F@%23%2Fsrc%2Fhello.txt"


@pytest.fixture
def session() -> Iterator[requests.Session]:
    s = build_session(Settings.from_env({"AIS_TARGET_URL": "http://127.0.0.1:1" + SECRET_PATH}))
    yield s
    s.close()


# --- FileSource --------------------------------------------------------------------------------


@pytest.fixture
def obj(tmp_path: Path) -> Path:
    """Overrides conftest's ``obj``: a name with a space, ``.../@ais/src/%ob/hello world.txt``."""
    return write_object(tmp_path / "@ais" / "src" / "%ob" / "hello world.txt")


def test_file_source_reads_the_file(obj) -> None:
    src = FileSource(path_escape(obj), "src/hello world.txt")
    assert src.fs_path == str(obj)
    assert src.replayable
    assert src.read_all() == b"hello"
    with src.open() as reader:
        assert reader.read() == b"hello"
    with src.open() as again:  # re-openable: that is what makes it replayable
        assert again.read(2) == b"he"
    assert src.check() == str(obj)


def test_file_source_normalizes_the_fqn(obj, tmp_path) -> None:
    twisted = path_escape(tmp_path / "@ais" / "src" / "x" / ".." / "%ob" / "." / "hello world.txt")
    assert FileSource(twisted, "o").fs_path == str(obj)


@pytest.mark.parametrize("action", ["open", "read_all", "check"])
def test_missing_file_is_404_naming_both_paths(tmp_path, action: str) -> None:
    gone = tmp_path / "gone.txt"
    src = FileSource(path_escape(gone), "src/gone.txt")
    with pytest.raises(ObjectNotFoundError) as info:
        getattr(src, action)()
    err = info.value
    assert err.status == 404
    assert err.message == f"Error processing object 'src/gone.txt': file not found at '{gone}'."


@pytest.mark.parametrize("action", ["open", "read_all", "check"])
def test_directory_is_404(tmp_path, action: str) -> None:
    with pytest.raises(ObjectNotFoundError):
        getattr(FileSource(path_escape(tmp_path), "src/dir"), action)()


@pytest.mark.parametrize("action", ["open", "read_all", "check"])
def test_fifo_is_404_without_blocking(tmp_path, action: str) -> None:
    """Opening a FIFO for reading waits for a writer: the source must not (a hung request)."""
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ObjectNotFoundError):
        getattr(FileSource(path_escape(tmp_path / "fifo"), "src/f"), action)()


@pytest.mark.parametrize("action", ["open", "read_all", "check"])
def test_device_is_404_not_an_endless_read(action: str) -> None:
    with pytest.raises(ObjectNotFoundError, match="/dev/zero"):
        getattr(FileSource(path_escape("/dev/zero"), "src/z"), action)()


def test_read_error_is_400() -> None:
    """``/proc/self/mem`` is a regular file whose read fails (EIO): a clear 400, not a 500."""
    with pytest.raises(BadRequestError, match="Input/output error"):
        FileSource(path_escape("/proc/self/mem"), "src/m").read_all()


@pytest.mark.parametrize("action", ["open", "check"])
def test_path_through_a_file_is_404(obj, action: str) -> None:
    with pytest.raises(ObjectNotFoundError):
        getattr(FileSource(path_escape(obj / "below"), "o"), action)()


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode"
)
def test_permission_denied_is_403(obj) -> None:
    obj.chmod(0)
    try:
        with pytest.raises(FileAccessError) as info:
            FileSource(path_escape(obj), "src/hello.txt").read_all()
        assert info.value.status == 403
        assert "permission denied" in info.value.message
    finally:
        obj.chmod(0o644)


@pytest.mark.parametrize("action", ["open", "check"])
def test_nul_byte_is_400(tmp_path, action: str) -> None:
    src = FileSource(path_escape(tmp_path) + "%2Fa%00b", "o")
    with pytest.raises(BadRequestError) as info:
        getattr(src, action)()
    assert info.value.status == 400
    assert "Invalid etl_fqn" in info.value.message


def test_name_too_long_is_400(tmp_path) -> None:
    src = FileSource(path_escape(tmp_path / ("x" * 5000)), "o")
    with pytest.raises(BadRequestError) as info:
        src.open()
    assert "cannot open" in info.value.message


# --- UpstreamSource ----------------------------------------------------------------------------


def upstream(session: requests.Session, target: FakeTarget, path: str = UNAME) -> UpstreamSource:
    return UpstreamSource(session, target.url + SECRET_PATH, path, TIMEOUT)


def test_upstream_read_all(session, target: FakeTarget) -> None:
    target.objects[f"{SECRET_PATH}/{ESCAPED}"] = b"hello"
    src = upstream(session, target)
    assert src.replayable
    assert src.url == f"{target.url}{SECRET_PATH}/{ESCAPED}"
    assert src.read_all() == b"hello"
    (get,) = target.requests
    assert (get.method, get.raw_path) == ("GET", f"{SECRET_PATH}/{ESCAPED}")


def test_upstream_start_gets_the_headers_and_open_reads_that_reply(
    session, target: FakeTarget
) -> None:
    target.objects[f"{SECRET_PATH}/{ESCAPED}"] = b"hello"
    src = upstream(session, target)
    assert src.size_hint() is None  # nothing sent yet
    assert src.start() == 5 == src.size_hint()  # Content-Length, before any body is read
    assert src.start() == 5  # once
    assert src.read_all() == b"hello"
    assert len(target.requests) == 1  # the started reply was read, not a second GET
    assert src.read_all() == b"hello"  # replayable: a new GET
    assert len(target.requests) == 2


def test_upstream_close_lets_go_of_a_started_reply(session, target: FakeTarget) -> None:
    target.objects[f"{SECRET_PATH}/{ESCAPED}"] = b"x" * 100_000
    src = upstream(session, target)
    src.start()
    started = src._started
    assert started is not None
    src.close()
    src.close()  # idempotent
    assert started.raw.closed
    assert src.read_all() == b"x" * 100_000  # a new GET after that


def test_upstream_open_streams(session, target: FakeTarget) -> None:
    target.objects[f"{SECRET_PATH}/{ESCAPED}"] = b"x" * 100_000
    with upstream(session, target).open() as reader:
        assert isinstance(reader, ResponseReader)
        assert reader.read(10) == b"x" * 10
        assert len(reader.read()) == 99_990


@pytest.mark.parametrize("status", [404, 403, 500, 503])
@pytest.mark.parametrize("action", ["open", "read_all"])
def test_upstream_status_is_forwarded(session, target: FakeTarget, status, action) -> None:
    target.get_status[f"{SECRET_PATH}/{ESCAPED}"] = status
    with pytest.raises(UpstreamStatusError) as info:
        getattr(upstream(session, target), action)()
    assert info.value.status == status
    assert info.value.message == "Target request failed"


def test_upstream_missing_object_is_404(session, target: FakeTarget) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        upstream(session, target, "ais/@#/src/none").read_all()
    assert info.value.status == 404


@pytest.mark.parametrize("action", ["open", "read_all"])
def test_upstream_refused_is_502(session, action: str) -> None:
    src = UpstreamSource(session, f"http://127.0.0.1:{closed_port()}{SECRET_PATH}", UNAME, TIMEOUT)
    with pytest.raises(UpstreamNetworkError) as info:
        getattr(src, action)()
    assert info.value.status == 502
    assert info.value.message.startswith("Network error: ConnectionError: ")


def test_stream_get_sends_what_session_get_sends(target: FakeTarget) -> None:
    """The light hpull GET (direct_put.stream_get) and ``session.get`` put the same request on
    the wire: method, path, headers (the token included); neither follows a redirect."""
    settings = Settings.from_env(
        {"AIS_TARGET_URL": target.url + SECRET_PATH, "AIS_AUTHN_TOKEN": "tok3n"}
    )
    path = f"{SECRET_PATH}/{ESCAPED}"
    target.scripts[path] = [Reply(302, b"", {"Location": "/elsewhere"})] * 2
    with build_session(settings) as session:
        light = stream_get(session, target.url + path, TIMEOUT)
        plain = session.get(target.url + path, stream=True, timeout=TIMEOUT, allow_redirects=False)
        assert light.status_code == plain.status_code == 302
        light.close()
        plain.close()
    first, second = target.requests
    assert (first.method, first.raw_path) == (second.method, second.raw_path) == ("GET", path)
    assert first.headers == second.headers
    assert first.header("Authorization") == "Bearer tok3n"


def test_stream_get_of_a_customised_session_takes_session_get(target: FakeTarget) -> None:
    """A session given auth (or params, cookies, hooks, proxies, trust_env) keeps all of it."""
    target.objects[f"{SECRET_PATH}/{ESCAPED}"] = b"hello"
    with build_session(Settings.from_env({"AIS_TARGET_URL": target.url + SECRET_PATH})) as s:
        s.auth = ("user", "pw")
        s.params = {"extra": "1"}
        resp = stream_get(s, f"{target.url}{SECRET_PATH}/{ESCAPED}", TIMEOUT)
        assert resp.raw.read() == b"hello"
        resp.close()
    (get,) = target.requests
    assert get.header("Authorization") == "Basic dXNlcjpwdw=="
    assert get.query == [("extra", "1")]


def _pooled(session: requests.Session, url: str) -> list:
    """Connections idle in the adapter's plain-HTTP pool for ``url``'s host (the hpull GET
    goes over it, :meth:`SessionAdapter.get_raw`); nothing is left in urllib3's pools."""
    adapter = session.get_adapter(url)
    assert isinstance(adapter, SessionAdapter)
    assert not adapter.poolmanager.pools.keys()
    parts = urlsplit(url)
    return list(adapter._idle.get((parts.hostname, parts.port), []))


def test_response_reader_close_returns_the_connection_to_the_pool(
    session, target: FakeTarget
) -> None:
    target.objects[f"{SECRET_PATH}/{ESCAPED}"] = b"hello"
    src = upstream(session, target)
    socks = set()
    for _ in range(3):
        reader = src.open()
        assert _pooled(session, src.url) == []  # in use while the body is unread
        assert reader.read() == b"hello"
        reader.close()
        assert reader.closed
        (conn,) = _pooled(session, src.url)
        assert conn.sock is not None  # back in the pool, still connected: kept alive
        socks.add(conn.sock)
    assert len(socks) == 1  # one socket served all three GETs


def test_read_all_keeps_the_connection_alive(session, target: FakeTarget) -> None:
    target.objects[f"{SECRET_PATH}/{ESCAPED}"] = bytes(range(256)) * 4096  # 1 MiB
    src = upstream(session, target)
    socks = set()
    for _ in range(3):
        assert src.read_all() == bytes(range(256)) * 4096
        (conn,) = _pooled(session, src.url)
        assert conn.sock is not None
        socks.add(conn.sock)
    assert len(socks) == 1


@pytest.fixture
def truncating_target() -> Iterator[str]:
    """A target answering every GET with ``Content-Length: 1000`` and 5 bytes, then closing."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while self.rfile.readline(65537) not in (b"\r\n", b""):
                pass
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nshort")

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}{SECRET_PATH}"
        server.shutdown()


def test_read_all_of_a_truncated_body_is_502(session, truncating_target: str) -> None:
    src = UpstreamSource(session, truncating_target, UNAME, TIMEOUT)
    with pytest.raises(UpstreamNetworkError) as info:
        src.read_all()
    assert info.value.status == 502
    assert "IncompleteRead(5 bytes read, 995 more expected)" in info.value.message
    assert _pooled(session, src.url) == []  # never reused


def test_response_reader_close_after_partial_read(session, target: FakeTarget) -> None:
    target.objects[f"{SECRET_PATH}/{ESCAPED}"] = b"y" * 200_000
    src = upstream(session, target)
    reader = src.open()
    assert reader.read(5) == b"yyyyy"
    assert _pooled(session, src.url) == []
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(ValueError):
        reader.read(1)
    # close() closed the connection mid-body: never pooled, never reused
    assert _pooled(session, src.url) == []
    target.objects[f"{SECRET_PATH}/{ESCAPED}"] = b"small"
    assert src.read_all() == b"small"
    assert len({r.peer_port for r in target.requests}) == 2  # a new connection for that


def test_response_reader_failure_is_a_network_error(session, target: FakeTarget) -> None:
    """A reply cut short while the transform reads it is a 502, not the transform's 500."""
    target.scripts[f"{SECRET_PATH}/{ESCAPED}"] = [Truncated(200, b"partial", declared=1000)]
    with upstream(session, target).open() as reader:
        assert reader.read(7) == b"partial"
        with pytest.raises(UpstreamNetworkError) as info:
            reader.read(100)
    assert info.value.status == 502
    assert info.value.message.startswith("Network error: reading the target's reply: ")


def test_response_reader_works_with_buffered_io(session, target: FakeTarget) -> None:
    target.objects[f"{SECRET_PATH}/{ESCAPED}"] = b"line1\nline2\n"
    with io.BufferedReader(upstream(session, target).open()) as buffered:
        assert buffered.readline() == b"line1\n"
        assert buffered.read() == b"line2\n"


# --- BodySource / DrainingReader ---------------------------------------------------------------


def test_body_source_is_one_shot() -> None:
    src = BodySource(io.BytesIO(b"hello"))
    assert not src.replayable
    assert src.read_all() == b"hello"


def test_body_shorter_than_content_length_is_400() -> None:
    """gunicorn ends a short body with a plain EOF: it must not pass for the whole object."""
    assert BodySource(io.BytesIO(b"hello"), 5).read_all() == b"hello"
    with pytest.raises(IncompleteBodyError) as info:
        BodySource(io.BytesIO(b"hel"), 5).read_all()
    assert info.value.status == 400
    assert info.value.message == "Request body ended after 3 of 5 bytes (Content-Length)"


@pytest.mark.parametrize("sizes", [[-1], [2, 2, 2], [None], [1, 1, 1, 1]])
def test_draining_reader_raises_when_the_body_ends_early(sizes: list[int | None]) -> None:
    reader = BodySource(io.BytesIO(b"hel"), 5).open()
    with pytest.raises(IncompleteBodyError, match="ended after 3 of 5 bytes"):
        for size in sizes:
            reader.read(size)
    reader.close()


def test_draining_reader_read_error_is_400() -> None:
    """gunicorn raises ``NoMoreData`` (an ``OSError``) when a chunked body is cut mid-chunk."""
    reader = DrainingReader(BrokenStream(OSError("No more data")))  # type: ignore[arg-type]
    with pytest.raises(BadRequestError) as info:
        reader.read(10)
    assert info.value.status == 400
    assert info.value.message == "Request body could not be read: OSError: No more data"
    reader.close()


class BadFraming(Exception):
    """Like gunicorn's ``InvalidChunkSize``: a plain ``Exception``, not an ``OSError``."""


@pytest.mark.parametrize("action", ["read_all", "open"])
def test_broken_chunked_framing_is_400(action: str) -> None:
    src = BodySource(BrokenStream(BadFraming("Invalid chunk size: b'zz'")))  # type: ignore[arg-type]
    with pytest.raises(BadRequestError) as info:
        src.read_all() if action == "read_all" else src.open().read(10)
    assert info.value.status == 400
    assert info.value.message == (
        "Request body could not be read: BadFraming: Invalid chunk size: b'zz'"
    )


def test_draining_reader_with_a_complete_body_reads_to_eof() -> None:
    reader = BodySource(io.BytesIO(b"hello"), 5).open()
    assert [reader.read(2), reader.read(2), reader.read(2), reader.read(2)] == [
        b"he",
        b"ll",
        b"o",
        b"",
    ]
    assert reader.read(0) == b""
    reader.close()


class RecordingStream(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.sizes.append(-1 if size is None else size)
        return super().read(size)


def test_draining_reader_drains_the_rest_on_close() -> None:
    inner = RecordingStream(b"z" * (3 * DRAIN_CHUNK_BYTES + 10))
    reader = BodySource(inner).open()
    assert isinstance(reader, DrainingReader)
    assert reader.read(3) == b"zzz"
    reader.close()
    assert inner.tell() == len(inner.getvalue())
    assert inner.sizes[1:] == [DRAIN_CHUNK_BYTES] * 5  # 4 reads of data, then EOF
    assert reader.closed
    with pytest.raises(ValueError, match="closed"):
        reader.read()
    reader.close()  # idempotent: nothing read again
    assert len(inner.sizes) == 6


def test_draining_reader_read_forms() -> None:
    reader = DrainingReader(io.BytesIO(b"abcdefgh"))
    assert reader.readable()
    buf = bytearray(3)
    assert reader.readinto(buf) == 3
    assert bytes(buf) == b"abc"
    assert reader.read(None) == b"defgh"
    assert reader.readall() == b""
    reader.close()


class BrokenStream:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        raise self.exc


@pytest.mark.parametrize("exc", [OSError("reset"), ValueError("I/O on closed file")])
def test_draining_reader_tolerates_errors_while_draining(exc: Exception) -> None:
    inner = BrokenStream(exc)
    reader = DrainingReader(inner)  # type: ignore[arg-type]
    reader.close()
    assert reader.closed
    assert inner.reads == 1


def test_draining_reader_over_a_closed_stream() -> None:
    inner = io.BytesIO(b"abc")
    inner.close()
    reader = DrainingReader(inner)
    reader.close()  # ValueError from the closed stream is swallowed
    assert reader.closed


# --- select_source ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "kind"),
    [
        (ParsedRequest("PUT", "src/a", fqn="%2Fmp1%2Fa"), FileSource),
        (ParsedRequest("GET", "src/a", fqn="%2Fmp1%2Fa"), FileSource),
        (ParsedRequest("GET", UNAME), UpstreamSource),
        (ParsedRequest("PUT", "src/a"), BodySource),
    ],
)
def test_select_source(session, req: ParsedRequest, kind: type) -> None:
    src = select_source(
        req,
        io.BytesIO(b""),
        session=session,
        host_target="http://t:1" + SECRET_PATH,
        timeout=TIMEOUT,
    )
    assert type(src) is kind
    if kind is UpstreamSource:
        assert src.url == f"http://t:1{SECRET_PATH}/{ESCAPED}"
    if kind is FileSource:
        assert (src.fs_path, src.obj_path) == ("/mp1/a", "src/a")
