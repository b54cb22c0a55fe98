"""End-to-end streaming (``transform_stream``) against a real ``gunicorn -k gevent`` server.

PROTOCOL.md §2.7 (chunked reply, no ``Content-Length``), §3 (FQN), §4.3 (streaming direct put),
§5 (errors before/after the first chunk, early exit and drain, readers always closed, constant
memory) and the §10 "Streaming conformance extras".  Everything is asserted on the wire; the
reader-closing probe (``transformers.CloseProbe``) reports through marker files.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import urllib3

from tests.conftest import GunicornServer
from tests.e2e_support import (
    MIB,
    TIMEOUT,
    booted,
    connect,
    request,
    vm_hwm_kib,
    wait_for_file,
)
from tests.fake_target import SECRET_PATH, FakeTarget, ResetMidBody
from tests.unit_support import DST_PATH, dst, fqn_query, write_object

#: Peak RSS growth allowed to a worker streaming 256 MiB.
MAX_RSS_GROWTH_KIB = 64 * 1024
BIG = 256 * MIB


@pytest.fixture(scope="module")
def upper_stream(module_target: FakeTarget) -> Iterator[GunicornServer]:
    """One ``UpperStream`` server shared by the module's simple cases (a boot costs ~0.6 s)."""
    with booted("transformers:UpperStream", module_target) as server:
        yield server


@pytest.fixture(scope="module")
def probe(module_target: FakeTarget) -> Iterator[GunicornServer]:
    with booted("transformers:CloseProbe", module_target) as server:
        yield server


def letters(n: int) -> bytes:
    """``n`` bytes of lower-case text (so upper-casing changes every byte)."""
    return (b"abcdefghijklmnopqrstuvwxyz" * (n // 26 + 1))[:n]


def assert_streamed(headers: http.client.HTTPMessage) -> None:
    """PROTOCOL.md §2.7 streaming row: chunked, no Content-Length, octet-stream."""
    assert headers.get("Content-Length") is None
    assert headers.get("Transfer-Encoding") == "chunked"
    assert headers.get("Content-Type") == "application/octet-stream"


# ---- plain streaming replies -------------------------------------------------------------------


def test_vector2_streamed_has_no_content_length_and_same_body(upper_stream: GunicornServer):
    status, headers, body = request(
        upper_stream, "PUT", "/src/hello.txt", b"hello", {"Content-Length": "5"}
    )
    assert status == 200
    assert_streamed(headers)
    assert body == b"HELLO"


def test_fqn_streamed(upper_stream: GunicornServer, tmp_path: Path):
    obj = write_object(tmp_path / "mp1" / "@ais" / "src" / "%ob" / "hello.txt")
    status, headers, body = request(
        upper_stream, "PUT", f"/src/hello.txt?etl_fqn={fqn_query(obj)}&etl_args=x", b""
    )
    assert status == 200
    assert_streamed(headers)
    assert body == b"HELLO"


def test_fqn_streamed_missing_file_is_404(upper_stream: GunicornServer, tmp_path: Path):
    gone = tmp_path / "gone"
    status, _, body = request(upper_stream, "PUT", f"/src/gone.txt?etl_fqn={fqn_query(gone)}", b"")
    assert status == 404
    message = json.loads(body)["error"]
    assert "src/gone.txt" in message and str(gone) in message


@pytest.mark.parametrize("size", [5, 3 * MIB + 7], ids=["small", "multi-chunk"])
def test_hpull_streamed_from_target(upper_stream: GunicornServer, target: FakeTarget, size: int):
    obj_path = "/ais%2F@%23%2Fsrc%2Fhello.txt"
    target.objects[SECRET_PATH + obj_path] = letters(size)
    status, headers, body = request(upper_stream, "GET", obj_path)
    assert status == 200
    assert_streamed(headers)
    assert body == letters(size).upper()
    (get,) = [r for r in target.requests if r.method == "GET"]
    assert get.raw_path == SECRET_PATH + obj_path


# ---- errors ------------------------------------------------------------------------------------


def test_stream_failing_before_first_chunk_is_500_json(module_target: FakeTarget):
    with booted("transformers:StreamFailFirst", module_target) as server:
        status, headers, body = request(server, "PUT", "/src/a.txt", b"hello")
    assert status == 500
    assert headers.get("Content-Type") == "application/json"
    assert headers.get("Content-Length") == str(len(body))
    assert json.loads(body) == {"error": "bad stream"}


def test_stream_failing_mid_body_aborts_the_chunked_reply(module_target: FakeTarget):
    """Headers are out: the body must be cut (no terminating chunk), never a clean short 200."""
    with booted("transformers:StreamFailMid", module_target) as server:
        with requests.put(f"{server.url}/src/a.txt", data=b"hello", stream=True) as resp:
            assert resp.status_code == 200
            assert "Content-Length" not in resp.headers
            received = 0
            with pytest.raises(
                (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)
            ):
                for chunk in resp.iter_content(65536):
                    received += len(chunk)
        # the same failure, seen by a client that parses chunked framing itself
        conn = connect(server)
        try:
            conn.request("PUT", "/src/a.txt", body=b"hello")
            with conn.getresponse() as raw, pytest.raises(http.client.IncompleteRead) as exc:
                raw.read()
        finally:
            conn.close()
    assert received == 4 * 65536
    assert exc.value.partial == b"A" * (4 * 65536)


# ---- keep-alive, chunked requests --------------------------------------------------------------


def test_partial_read_leaves_keepalive_connection_usable(module_target: FakeTarget):
    """§10 extra (a): 3 bytes read of a 1 MiB body; the rest is drained, the socket reused."""
    with booted("transformers:StreamReads3", module_target) as server:
        conn = connect(server)
        try:
            conn.request("PUT", "/src/big.bin", body=b"abc" + b"z" * (MIB - 3))
            with conn.getresponse() as first:
                assert first.status == 200
                assert first.headers.get("Connection") != "close"
                assert first.read() == b"ABC"
            sock = conn.sock
            assert sock is not None
            local = sock.getsockname()
            conn.request("PUT", "/src/small.txt", body=b"hello")
            with conn.getresponse() as second:
                assert second.status == 200
                assert second.read() == b"HEL"
            conn.request("GET", "/health")
            with conn.getresponse() as health:
                assert (health.status, health.read()) == (200, b"Running")
            # http.client reconnects silently after a close: prove it did not
            assert conn.sock is sock
            assert sock.getsockname() == local
        finally:
            conn.close()


def chunked_body(parts: list[bytes]) -> Iterator[bytes]:
    yield from parts


@pytest.mark.parametrize("app", ["transformers:Upper", "transformers:UpperStream"])
def test_chunked_request_body(module_target: FakeTarget, app: str):
    """PROTOCOL.md §5: upstream streaming stages send chunked PUTs; both modes accept them."""
    parts = [b"hel", b"lo ", letters(200_000), b"", b"!"]
    expected = b"".join(parts).upper()
    with (
        booted(app, module_target) as server,
        requests.put(f"{server.url}/src/a.txt", data=chunked_body(parts)) as resp,
    ):
        assert resp.request.headers.get("Transfer-Encoding") == "chunked"
        assert resp.status_code == 200
        assert resp.content == expected
        if app.endswith("Stream"):
            assert "Content-Length" not in resp.headers
        else:
            assert resp.headers["Content-Length"] == str(len(expected))


# ---- streaming direct put ----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["body", "fqn"])
def test_stream_direct_put_is_chunked(
    upper_stream: GunicornServer, target: FakeTarget, tmp_path: Path, source: str
):
    """§4.2 step 6 / §4.3: chunked PUT with the exact bytes; 200-empty -> 204 + byte count."""
    data = letters(300_000)
    uri = "/src/a.txt?etl_args=q"
    body = data
    if source == "fqn":
        obj = tmp_path / "a.txt"
        obj.write_bytes(data)
        uri += f"&etl_fqn={fqn_query(obj)}"
        body = b""
    hop = dst(target)
    status, headers, reply = request(upper_stream, "PUT", uri, body, {"Ais-Node-Url": hop})
    assert (status, reply) == (204, b"")
    assert headers.get("Ais-Direct-Put-Length") == str(len(data))
    (put,) = target.puts
    assert put.path == SECRET_PATH + DST_PATH
    assert put.query == [("owt", "3"), ("uuid", "XID1"), ("etl_args", "q")]
    assert put.chunked
    assert put.header("Content-Length") is None
    assert put.header("Ais-Node-Url") is None
    assert put.body == data.upper()


# ---- readers closed on every path --------------------------------------------------------------


def probe_target(directory: Path) -> str:
    """``CloseProbe`` request target: the probe's marker directory travels in ``etl_args``."""
    return f"/src/probe.txt?etl_args={quote(str(directory), safe='')}"


def release(directory: Path, plan: str) -> None:
    """Let ``CloseProbe`` go on with ``plan`` (created by rename: never seen half-written)."""
    tmp = directory / ".release.tmp"
    tmp.write_text(plan)
    tmp.replace(directory / "release")


def assert_closed_once(directory: Path) -> None:
    wait_for_file(directory / "closed")
    assert (directory / "closed.log").read_text().splitlines() == ["closed=True"]


def test_reader_closed_when_client_leaves_before_first_chunk(probe: GunicornServer, tmp_path: Path):
    """The client hangs up while the transform has not produced anything yet.

    Sequence, each step awaited on a marker file: the probe has read the input and is blocked
    (``started``); the client closes its socket; the probe is released and writes its reply into
    a dead connection; the server must still close the reader (``closed``).
    """
    head = (
        f"PUT {probe_target(tmp_path)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Length: 5\r\n\r\nhello"
    ).encode()
    with socket.create_connection(("127.0.0.1", probe.port), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        # the transform is running (input read) and blocked before its first chunk
        assert wait_for_file(tmp_path / "started") == "src/probe.txt"
    # client gone; release the transform with 256 filler chunks (16 MiB) to a closed socket
    release(tmp_path, "256")
    assert_closed_once(tmp_path)
    # the worker survived and serves the next request
    status, _, body = request(probe, "GET", "/health")
    assert (status, body) == (200, b"Running")


def test_reader_closed_when_client_leaves_mid_stream(probe: GunicornServer, tmp_path: Path):
    release(tmp_path, "2000")  # 125 MiB: far more than socket buffers hold
    conn = connect(probe)
    try:
        conn.request("PUT", probe_target(tmp_path), body=b"hello")
        with conn.getresponse() as resp:
            assert resp.status == 200
            assert resp.read(5) == b"HELLO"
    finally:
        conn.close()
    assert_closed_once(tmp_path)


@pytest.mark.parametrize(
    ("plan", "status", "body"),
    [
        ("2", 200, b"HELLO" + b"F" * 2 * 65536),
        ("0!", 500, b'{"error": "probe failed before the first chunk"}'),
    ],
    ids=["complete", "fails-before-first-chunk"],
)
def test_reader_closed_after_reply(
    probe: GunicornServer, tmp_path: Path, plan: str, status: int, body: bytes
):
    release(tmp_path, plan)
    got = request(probe, "PUT", probe_target(tmp_path), b"hello")
    assert (got[0], got[2]) == (status, body)
    assert_closed_once(tmp_path)


def test_reader_closed_when_stream_fails_mid_body(probe: GunicornServer, tmp_path: Path):
    release(tmp_path, "3!")
    conn = connect(probe)
    try:
        conn.request("PUT", probe_target(tmp_path), body=b"hello")
        with conn.getresponse() as resp, pytest.raises(http.client.IncompleteRead):
            assert resp.status == 200
            resp.read()
    finally:
        conn.close()
    assert_closed_once(tmp_path)


@pytest.mark.parametrize("plan", ["1", "1!"], ids=["delivered", "fails-mid-put"])
def test_reader_closed_after_direct_put(
    probe: GunicornServer, target: FakeTarget, tmp_path: Path, plan: str
):
    release(tmp_path, plan)
    if plan.endswith("!"):  # the put is cut mid-body: the hop drops it instead of replying
        target.script = [ResetMidBody(after=1 << 30)]
    hop = dst(target)
    status, headers, body = request(
        probe, "PUT", probe_target(tmp_path), b"hello", {"Ais-Node-Url": hop}
    )
    if plan.endswith("!"):
        assert (status, json.loads(body)) == (500, {"error": "probe failed mid-stream"})
    else:
        assert (status, body) == (204, b"")
        assert headers.get("Ais-Direct-Put-Length") == str(5 + 65536)
        assert target.puts[0].body == b"HELLO" + b"F" * 65536
    assert_closed_once(tmp_path)


# ---- constant memory ---------------------------------------------------------------------------


def only_worker(server: GunicornServer) -> int:
    (pid,) = server.worker_pids()
    return pid


def sparse_object(directory: Path, size: int) -> Path:
    """A sparse file of ``size`` bytes: ``head``, zeros, ``tail``."""
    obj = directory / f"obj-{size}.bin"
    with obj.open("wb") as f:
        f.write(b"head")
        f.seek(size - 4)
        f.write(b"tail")
    return obj


def fqn_peak_growth(server: GunicornServer, tmp_path: Path) -> int:
    """Worker peak-RSS growth (KiB) while 256 MiB of an FQN object stream through ``server``.

    The baseline is taken after a 4 MiB warm-up, so the 256 MiB request sets the new peak.
    """
    worker = only_worker(server)
    url = f"{server.url}/src/big.bin?etl_fqn="
    with requests.put(url + fqn_query(sparse_object(tmp_path, 4 * MIB)), timeout=TIMEOUT) as warm:
        assert (warm.status_code, len(warm.content)) == (200, 4 * MIB)
    base = vm_hwm_kib(worker)
    started = time.monotonic()
    total, first, last = 0, b"", b""
    big = url + fqn_query(sparse_object(tmp_path, BIG))
    with requests.put(big, stream=True, timeout=TIMEOUT) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_content(MIB):
            first = first or chunk[:4]
            last = (last + chunk)[-4:]
            total += len(chunk)
            assert time.monotonic() - started < 60, "256 MiB took over 60 s"
    assert (total, first, last) == (BIG, b"HEAD", b"TAIL")
    return vm_hwm_kib(worker) - base


def test_constant_memory_streaming_256mib_fqn(module_target: FakeTarget, tmp_path: Path):
    with booted("transformers:UpperStream", module_target) as server:
        growth = fqn_peak_growth(server, tmp_path)
    assert growth < MAX_RSS_GROWTH_KIB, f"worker peak RSS grew by {growth} KiB"


def test_peak_rss_probe_sees_a_buffered_transform(module_target: FakeTarget, tmp_path: Path):
    """Control for the test above: the same measurement catches a server that buffers."""
    with booted("transformers:Upper", module_target) as server:
        growth = fqn_peak_growth(server, tmp_path)
    assert growth > BIG // 1024, f"buffered 256 MiB but peak RSS grew by only {growth} KiB"


def test_constant_memory_full_duplex_put_256mib(module_target: FakeTarget):
    """A 256 MiB PUT body written by one thread while the chunked reply is read by another.

    A client that sends the whole body before reading would deadlock against any full-duplex
    streaming server (both sides' socket buffers fill up); the AIS Go target reads concurrently.
    """
    with booted("transformers:UpperStream", module_target) as server:
        worker = only_worker(server)
        status, _, body = request(server, "PUT", "/src/warm", b"warm" * MIB)
        assert (status, len(body)) == (200, 4 * MIB)
        base = vm_hwm_kib(worker)
        total, upper_ok, errors = duplex_put(server, BIG)
        growth = vm_hwm_kib(worker) - base
    assert errors == []
    assert total == BIG
    assert upper_ok
    assert growth < MAX_RSS_GROWTH_KIB, f"worker peak RSS grew by {growth} KiB"


def duplex_put(server: GunicornServer, size: int) -> tuple[int, bool, list[BaseException]]:
    """PUT ``size`` bytes of ``a`` on a raw socket from a writer thread; read the reply here."""
    block = b"a" * MIB
    head = (
        f"PUT /src/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    errors: list[BaseException] = []
    deadline = time.monotonic() + 60

    def write() -> None:
        try:
            sock.sendall(head)
            for _ in range(size // MIB):
                sock.sendall(block)
        except OSError as exc:
            errors.append(exc)

    total, upper_ok = 0, True
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        resp = http.client.HTTPResponse(sock, method="PUT")
        try:
            resp.begin()
            assert resp.status == 200
            assert resp.getheader("Transfer-Encoding") == "chunked"
            for _ in range(size):  # bounded; ends at the terminating chunk
                chunk = resp.read(MIB)
                if not chunk:
                    break
                total += len(chunk)
                upper_ok = upper_ok and chunk.count(b"A") == len(chunk)
                assert time.monotonic() < deadline, "full-duplex PUT took over 60 s"
        finally:
            resp.close()
            writer.join(max(0.0, deadline - time.monotonic()))
    assert not writer.is_alive()
    return total, upper_ok, errors
