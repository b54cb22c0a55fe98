"""Graceful shutdown: SIGTERM (what Kubernetes sends) to the gunicorn master.

The server stops accepting at once, lets the requests in flight finish within
``ETL_GRACEFUL_TIMEOUT`` (gunicorn's ``graceful_timeout``) and exits; a request still running at
the end of the grace period is cut.  Progress is deterministic: the transforms in flight
(``transformers.Gate`` / ``GateStream``) wait for a file the test creates.  WebSocket sessions
close with 1001 on SIGTERM (etl_wsgi/lifecycle.py; tests/test_e2e_ws.py).
"""

from __future__ import annotations

import http.client
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import GunicornServer
from tests.e2e_support import MIB, TIMEOUT, connect, request, wait_for_file
from tests.fake_target import SECRET_PATH, FakeTarget
from tests.unit_support import dst

GRACE = 60  # generous: the machine is shared; the test never waits for it to run out
INLINE = {"ETL_TRANSFORM_EXECUTOR": "inline"}  # gated transforms wait cooperatively


def begin_shutdown(server: GunicornServer) -> float:
    """Close the test's copy of the listening socket, then SIGTERM the master; the time sent.

    (The test bound the socket and handed it to gunicorn: while it holds a copy, the kernel
    would keep accepting connections into the backlog after gunicorn closed its own.)
    """
    server.sock.close()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    return time.monotonic()


def wait_until_refused(server: GunicornServer) -> None:
    """Bounded: new connections are refused once the master and workers closed the listener."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.05)
    raise AssertionError("new connections were still accepted after SIGTERM")


def release(directory: Path) -> None:
    (directory / "release").write_text("go")


def streamed(
    pool: ThreadPoolExecutor, server: GunicornServer, path: str, body: bytes
) -> Future[bytes]:
    """A streaming PUT whose status line and first chunk are read before this returns; the
    future is the whole body (the rest read in ``pool``)."""
    conn = connect(server)
    conn.request("PUT", path, body=body)
    resp = conn.getresponse()
    assert resp.status == 200
    head = resp.read1(len(body))
    assert head == body.upper()

    def rest() -> bytes:
        try:
            return head + resp.read()
        finally:
            conn.close()

    return pool.submit(rest)


def test_sigterm_finishes_in_flight_requests_then_exits(
    serve: Callable[..., GunicornServer], tmp_path: Path, fake_target: FakeTarget
) -> None:
    buffered = serve("transformers:Gate", ETL_GRACEFUL_TIMEOUT=str(GRACE), **INLINE)
    streaming = serve("transformers:GateStream", ETL_GRACEFUL_TIMEOUT=str(GRACE))
    gate = f"?etl_args={tmp_path}"
    bodies = {f"/b/o{i}": bytes([97 + i]) * (MIB // 4) for i in range(3)}
    with ThreadPoolExecutor(5) as pool:
        replies = {
            path: pool.submit(request, buffered, "PUT", path + gate, body)
            for path, body in bodies.items()
        }
        put = pool.submit(
            request, buffered, "PUT", "/b/dp" + gate, b"direct", {"Ais-Node-Url": dst(fake_target)}
        )
        stream = streamed(pool, streaming, "/b/s" + gate, b"stream me")
        for name in ("b_o0", "b_o1", "b_o2", "b_dp", "b_s"):
            wait_for_file(tmp_path / f"started-{name}")

        sent = {srv: begin_shutdown(srv) for srv in (buffered, streaming)}
        for srv in (buffered, streaming):
            wait_until_refused(srv)
        assert not any(f.done() for f in (*replies.values(), put, stream))  # still in flight

        release(tmp_path)
        pid = wait_for_file(tmp_path / "started-b_o0")
        for path, body in bodies.items():
            status, _, data = replies[path].result(TIMEOUT)
            assert (status, data) == (200, f"{pid}:".encode() + body.upper())
        status, headers, data = put.result(TIMEOUT)
        assert (status, data, headers["Ais-Direct-Put-Length"]) == (204, b"", str(len(pid) + 7))
        (delivered,) = fake_target.puts
        assert delivered.body == f"{pid}:DIRECT".encode()
        assert stream.result(TIMEOUT) == b"STREAM ME" + b"F" * (16 * 65536)

    for srv in (buffered, streaming):
        assert srv.proc is not None
        assert srv.proc.wait(GRACE) == 0
        assert time.monotonic() - sent[srv] < GRACE
        log = srv.log()
        assert "Handling signal: term" in log
        assert "graceful timeout" not in log


def test_request_past_the_grace_period_is_cut(
    serve: Callable[..., GunicornServer], tmp_path: Path
) -> None:
    """What the client sees: the connection closes without a reply (``RemoteDisconnected``);
    a streamed reply already under way ends without its last chunk (``IncompleteRead``)."""
    buffered = serve("transformers:Gate", ETL_GRACEFUL_TIMEOUT="1", **INLINE)
    streaming = serve("transformers:GateStream", ETL_GRACEFUL_TIMEOUT="1")
    gate = f"?etl_args={tmp_path}"
    with ThreadPoolExecutor(2) as pool:
        reply = pool.submit(request, buffered, "PUT", "/b/slow" + gate, b"never")
        stream = streamed(pool, streaming, "/b/s" + gate, b"cut me")
        wait_for_file(tmp_path / "started-b_slow")
        wait_for_file(tmp_path / "started-b_s")
        sent = {srv: begin_shutdown(srv) for srv in (buffered, streaming)}  # never released
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            reply.result(TIMEOUT)
        with pytest.raises(http.client.IncompleteRead):
            stream.result(TIMEOUT)
    for srv in (buffered, streaming):
        assert srv.proc is not None
        srv.proc.wait(TIMEOUT)  # gunicorn kills what is left after the grace period
        assert time.monotonic() - sent[srv] < 1 + TIMEOUT
    assert SECRET_PATH not in buffered.log()
