"""Logs of the real server (stderr captured): ``ETL_LOG_FORMAT=json`` makes every line a JSON
object, gunicorn's included; a failed request is logged ONCE with its path and cause; the access
log is off unless ``ETL_ACCESS_LOG``; the per-ETL secret never reaches the log.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

from tests.conftest import GunicornServer
from tests.e2e_support import connect, request
from tests.fake_target import SECRET_PATH
from tests.unit_support import closed_port, fqn_query

SECRET = SECRET_PATH.rsplit("/", 1)[1]


def stopped_log(server: GunicornServer) -> str:
    """Everything the server wrote, after a graceful stop (its last lines included)."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    return server.log()


def test_json_lines_with_path_and_cause_once(serve: Callable[..., GunicornServer], tmp_path):
    # AIS_TARGET_URL points where nobody listens: an hpull GET fails with the URL in the cause
    target = f"http://127.0.0.1:{closed_port()}{SECRET_PATH}"
    server = serve(
        "transformers:Upper",
        ETL_LOG_FORMAT="json",
        ETL_ACCESS_LOG="1",
        AIS_TARGET_URL=target,
    )
    assert request(server, "PUT", "/b/ok", b"fine")[0::2] == (200, b"FINE")
    assert request(server, "PUT", "/b/boom", b"boom")[0] == 500
    missing = fqn_query(tmp_path / "nope")
    assert request(server, "GET", f"/b/missing?etl_fqn={missing}")[0] == 404
    assert request(server, "GET", "/b/remote")[0] == 502
    log = stopped_log(server)

    records: list[dict[str, Any]] = [json.loads(line) for line in log.splitlines() if line]
    gunicorn = [r["message"] for r in records if r["logger"] == "gunicorn.error"]
    assert any(m.startswith("Booting worker") for m in gunicorn)  # gunicorn's own lines too
    assert all({"time", "level", "logger", "pid", "message"} <= r.keys() for r in records)

    def about(path: str) -> list[dict[str, Any]]:
        return [r for r in records if path in r["message"] and r["logger"] != "gunicorn.access"]

    (boom,) = about("/b/boom")
    assert (boom["level"], boom["path"], boom["status"]) == ("ERROR", "/b/boom", 500)
    assert boom["cause"] == "bad (ValueError)"
    assert "exc" not in boom  # a transform error is its message, not a stack
    (gone,) = about("/b/missing")
    assert (gone["level"], gone["path"], gone["status"]) == ("WARNING", "/b/missing", 404)
    assert "file not found" in gone["cause"]
    (remote,) = about("/b/remote")
    assert (remote["level"], remote["status"]) == ("ERROR", 502)
    assert "ConnectionError" in remote["cause"]
    assert SECRET not in log
    assert "***" in remote["cause"]

    access = [r["message"] for r in records if r["logger"] == "gunicorn.access"]
    assert any('"PUT /b/ok HTTP/1.1" 200' in line for line in access)
    assert any('"PUT /b/boom HTTP/1.1" 500' in line for line in access)


def test_stream_cut_is_logged_once_without_a_stack(serve: Callable[..., GunicornServer]):
    """A stream failing after its status line: one plain line, not also gunicorn's traceback."""
    server = serve("transformers:StreamFailMid")
    conn = connect(server)
    try:
        conn.request("PUT", "/b/cut", body=b"x")
        resp = conn.getresponse()
        assert resp.status == 200
        try:
            resp.read()
        except Exception as exc:  # the body is cut: IncompleteRead or a reset
            assert type(exc).__name__ in ("IncompleteRead", "ConnectionResetError")
        else:
            raise AssertionError("the cut body was read as complete")
    finally:
        conn.close()
    log = stopped_log(server)
    lines = [line for line in log.splitlines() if "/cut" in line]
    assert len(lines) == 1, lines
    assert "ERROR" in lines[0]
    assert "transform_stream failed after 262144 bytes were sent; connection cut" in lines[0]
    assert "bad mid-stream (ValueError)" in lines[0]
    assert "Traceback" not in log
    assert "Error handling request" not in log
    assert '"PUT /b/cut' not in log  # access log off by default
