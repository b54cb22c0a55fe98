"""The gunicorn integration: import hygiene of the master, start-up validation, configuration
values, keep-alive and concurrency of the gevent workers (STYLE.md "Imports point one way",
"Configuration is declared once"; PROTOCOL.md §1.1, §9.1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import GunicornServer
from tests.e2e_support import TIMEOUT, booted, connect, request
from tests.fake_target import SECRET_PATH, FakeTarget

ROOT = Path(__file__).resolve().parent.parent
APP = 'etl_wsgi.app:create_app("transformers:Upper")'
REQUESTS_IN_MASTER = "'requests' was imported in the gunicorn master"


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any etl-wsgi / AIS setting, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ETL_", "AIS_", "GUNICORN_"))
        and k not in ("NUM_WORKERS", "DIRECT_PUT", "direct_put")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    env.update(extra)
    return env


# ---- import hygiene ----------------------------------------------------------------------------


def test_boot_has_no_monkeypatch_warning_and_no_requests_in_master(module_target: FakeTarget):
    with booted("transformers:UpperStream", module_target) as server:
        assert request(server, "PUT", "/src/a.txt", b"hello")[0::2] == (200, b"HELLO")
        log = server.log()
    assert "etl-wsgi: 1 gevent worker(s)" in log  # the master's own log lines are captured
    assert "Booting worker" in log
    assert "MonkeyPatchWarning" not in log
    assert REQUESTS_IN_MASTER not in log


def test_preloading_the_app_is_reported(module_target: FakeTarget):
    """Control for the test above: ``--preload`` imports requests in the master; both show."""
    with booted("transformers:Upper", module_target, GUNICORN_CMD_ARGS="--preload") as server:
        assert request(server, "PUT", "/src/a.txt", b"hello")[0::2] == (200, b"HELLO")
        log = server.log()
    assert REQUESTS_IN_MASTER in log
    assert "MonkeyPatchWarning" in log


@pytest.mark.parametrize(
    "load",
    [
        "runpy.run_path('gunicorn.conf.py')",
        "importlib.import_module('etl_wsgi.gunicorn_conf')",
    ],
    ids=["gunicorn.conf.py", "python:etl_wsgi.gunicorn_conf"],
)
def test_config_and_package_import_stay_light(load: str):
    """What the master runs before forking imports neither requests, Flask nor ssl."""
    code = (
        "import importlib, runpy, sys\n"
        f"ns = {load}\n"
        "import etl_wsgi, etl_wsgi.config, etl_wsgi.gunicorn_hooks\n"
        "assert etl_wsgi.__version__\n"
        "heavy = {'requests', 'urllib3', 'flask', 'werkzeug', 'ssl', 'gevent'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- start-up validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"AIS_DIRECT_PUT_RETRIES": "-1"}, "AIS_DIRECT_PUT_RETRIES"),
        ({"AIS_DIRECT_PUT_RETRIES": "abc"}, "AIS_DIRECT_PUT_RETRIES"),
        ({"ETL_WORKERS": "0"}, "ETL_WORKERS"),
        ({"ETL_KEEPALIVE": "soon"}, "ETL_KEEPALIVE"),
        ({"AIS_TARGET_URL": ""}, "AIS_TARGET_URL"),
        ({"AIS_TARGET_URL": "10.0.0.1:9080"}, "AIS_TARGET_URL"),
        ({"ETL_CLASS": "my_etl:Upper", "ETL_CLASS_PAYLOAD": "gASV"}, "ETL_CLASS_PAYLOAD"),
    ],
    ids=[
        "retries-negative",
        "retries-abc",
        "workers-0",
        "keepalive-abc",
        "target-missing",
        "target-no-scheme",
        "class-and-payload",
    ],
)
def test_bad_setting_fails_start_up(module_target: FakeTarget, env: dict[str, str], name: str):
    full = {"AIS_TARGET_URL": module_target.url + SECRET_PATH, **env}
    if not full["AIS_TARGET_URL"]:
        del full["AIS_TARGET_URL"]
    server = GunicornServer(APP, full)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"^gunicorn exited"):
            server.start(timeout=20)
        log = server.log()
    finally:
        server.stop()
    assert time.monotonic() - started < 20
    assert server.proc is not None and server.proc.returncode not in (0, None)
    (line,) = [x for x in log.splitlines() if x.startswith("etl-wsgi: invalid configuration: ")]
    assert name in line
    assert "Traceback" not in log  # one clear line, not a stack
    assert "Booting worker" not in log


def start_failing(env: dict[str, str], workers: int = 2) -> tuple[int | None, str, float]:
    """``create_app()`` under gunicorn with ``env``: its exit status, log and seconds taken.

    ``start`` returns if one worker serves before another fails; either way gunicorn must exit.
    """
    server = GunicornServer("etl_wsgi.app:create_app()", env, workers=workers)
    started = time.monotonic()
    try:
        try:
            server.start(timeout=30)
        except RuntimeError as exc:
            assert str(exc).startswith("gunicorn exited"), exc
        assert server.proc is not None
        status = server.proc.wait(timeout=30)
        log = server.log()
    finally:
        server.stop()
    return status, log, time.monotonic() - started


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        (
            {"ETL_CLASS": "transformers:Nope"},
            "Cannot import ETL class 'transformers:Nope' (ETL_CLASS): "
            "module 'transformers' has no attribute 'Nope'",
        ),
        (
            {"ETL_CLASS": "no_such_module_xyz:X"},
            "Cannot import ETL class 'no_such_module_xyz:X' (ETL_CLASS): "
            "No module named 'no_such_module_xyz'",
        ),
        (
            {"ETL_CLASS": "transformers:make_flask_app"},
            "ETL_CLASS='transformers:make_flask_app': <function make_flask_app",
        ),
        # base64 of b"not a pickle": base64 is checked in the master, unpickling in the workers
        ({"ETL_CLASS_PAYLOAD": "bm90IGEgcGlja2xl"}, "ETL_CLASS_PAYLOAD: cannot unpickle the class"),
    ],
    ids=["no-attribute", "no-module", "not-a-class", "payload-not-a-pickle"],
)
def test_bad_class_fails_start_up_in_one_line(
    module_target: FakeTarget, env: dict[str, str], shown: str
):
    """Found only when a worker imports it (never in the master): one line for the server,
    gunicorn's "App failed to load" (status 4), no traceback.  Two workers fail at once: before
    the fix, in about half of the starts gunicorn's master raised its HaltServer a second time
    (status 1, a traceback)."""
    status, log, seconds = start_failing({"AIS_TARGET_URL": module_target.url, **env})
    assert status == 4, log
    (line,) = [x for x in log.splitlines() if x.startswith("etl-wsgi: ")]
    assert line.startswith("etl-wsgi: " + shown), line
    assert "Traceback" not in log
    assert "Reason: App failed to load." in log
    assert seconds < 4  # the second worker did not wait for nothing: the halt stopped it


def test_class_failing_in_a_later_worker_alone_stops_the_server(
    module_target: FakeTarget, tmp_path: Path
):
    """The first worker to import ``load_once`` serves; the other fails, waits for a halt that
    does not come, then reports: the server stops with one line, not a worker restarted forever."""
    env = {
        "AIS_TARGET_URL": module_target.url,
        "ETL_CLASS": "load_once:Upper",
        "LOAD_ONCE_MARKER": str(tmp_path / "loaded"),
    }
    status, log, _ = start_failing(env)
    assert status == 4, log
    (line,) = [x for x in log.splitlines() if x.startswith("etl-wsgi: ")]
    assert "already loaded by another process" in line
    assert "Traceback" not in log


# ---- configuration values ----------------------------------------------------------------------


def print_config(config: str, **env: str) -> dict[str, str]:
    """``gunicorn -c config --print-config``: the settings gunicorn really uses.

    gunicorn also loads the app to check it, hence a (never contacted) ``AIS_TARGET_URL``.
    """
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", config, "--print-config", APP],
        cwd=ROOT,
        env=clean_env(AIS_TARGET_URL="http://127.0.0.1:9" + SECRET_PATH, **env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    values = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


@pytest.mark.parametrize("config", ["gunicorn.conf.py", "python:etl_wsgi.gunicorn_conf"])
def test_gunicorn_config_values(config: str):
    cfg = print_config(config)
    assert cfg["worker_class"] == "gevent"
    assert cfg["bind"] == "['0.0.0.0:8000']"  # PROTOCOL.md §1.1: port 8000, all interfaces
    # above the target's 6 s idle timeout (§9.1) and AIS's 45 s obj_timeout
    assert int(cfg["keepalive"]) > 6
    assert int(cfg["timeout"]) >= 45
    assert cfg["control_socket_disable"] == "True"
    assert cfg["preload_app"] == "False"
    assert int(cfg["workers"]) >= 1


def test_gunicorn_config_follows_settings():
    cfg = print_config(
        "gunicorn.conf.py",
        ETL_BIND="127.0.0.1:8123",
        ETL_WORKERS="3",
        ETL_KEEPALIVE="40",
        ETL_WORKER_TIMEOUT="90",
        NUM_WORKERS="5",  # the AIS runtime's alias loses to ETL_WORKERS
    )
    assert (cfg["bind"], cfg["workers"], cfg["keepalive"], cfg["timeout"]) == (
        "['127.0.0.1:8123']",
        "3",
        "40",
        "90",
    )
    assert print_config("gunicorn.conf.py", NUM_WORKERS="5")["workers"] == "5"


# ---- keep-alive and concurrency ----------------------------------------------------------------


def test_two_requests_on_one_keepalive_connection(module_target: FakeTarget):
    with booted("transformers:Upper", module_target) as server:
        conn = connect(server)
        try:
            conn.request("PUT", "/src/a.txt", body=b"hello")
            with conn.getresponse() as first:
                assert (first.status, first.read()) == (200, b"HELLO")
                assert first.headers.get("Connection") == "keep-alive"
            sock = conn.sock
            assert sock is not None
            conn.request("PUT", "/src/b.txt", body=b"world")
            with conn.getresponse() as second:
                assert (second.status, second.read()) == (200, b"WORLD")
            assert conn.sock is sock  # http.client would have reconnected after a close
        finally:
            conn.close()


def test_concurrent_slow_requests_overlap(module_target: FakeTarget):
    """50 PUTs of a transform sleeping 0.2 s (cooperatively) on 2 workers: far below 10 s.

    ``inline``: a cooperative transform runs in its greenlet, so the gevent worker overlaps all
    of them (in ``thread`` mode they would share ``ETL_TRANSFORM_THREADS`` threads).
    """
    n = 50
    barrier = threading.Barrier(n, timeout=TIMEOUT)

    def put(i: int) -> tuple[int, bytes]:
        conn = connect(server)
        try:
            conn.connect()
            barrier.wait()
            conn.request("PUT", f"/src/{i}.txt", body=f"obj-{i}".encode())
            with conn.getresponse() as resp:
                return resp.status, resp.read()
        finally:
            conn.close()

    with booted(
        "transformers:SlowUpper", module_target, workers=2, ETL_TRANSFORM_EXECUTOR="inline"
    ) as server:
        assert len(server.worker_pids()) == 2
        started = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(put, range(n), timeout=TIMEOUT))
        elapsed = time.monotonic() - started
    assert results == [(200, f"OBJ-{i}".encode()) for i in range(n)]
    print(f"{n} concurrent requests took {elapsed:.2f}s")
    assert elapsed < n * 0.2 / 4, f"{n} requests took {elapsed:.2f}s"


def test_workers_freeze_their_start_up_objects_out_of_the_gc(module_target: FakeTarget):
    """post_worker_init: gc.freeze() after the app is loaded (full collections skip them)."""
    with booted("transformers:GcFrozen", module_target) as server:
        status, _, body = request(server, "PUT", "/o", b"x")
    assert status == 200
    assert int(body) > 10_000  # Flask, Werkzeug, gevent, etl_wsgi and the app: far more


def test_workers_install_the_reply_and_parsing_patches(module_target: FakeTarget):
    """post_worker_init: etl_wsgi.reply_writes and etl_wsgi.worker_tuning are in place."""
    with booted("transformers:WorkerTuned", module_target) as server:
        expected = (200, b"peer-verdicts one-send date environ")
        assert request(server, "PUT", "/o", b"x")[0::2] == expected
        assert request(server, "PUT", "/o?etl_args=errors-marker-7", b"x")[0::2] == expected
        log = server.log()  # the shared wsgi.errors still writes to gunicorn's error log
    assert "errors-marker-7" in log


# ---- listening sockets: one per worker (SO_REUSEPORT) ------------------------------------------


def listening_sockets(port: int) -> dict[str, set[int]]:
    """Socket inode -> pids holding it, for every TCP socket listening on 127.0.0.1:``port``."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    holders: dict[str, set[int]] = {inode: set() for inode in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # gone, or not ours
            continue
        for inode in holders:
            if f"socket:[{inode}]" in links:
                holders[inode].add(int(pid))
    return holders


def test_each_worker_listens_on_its_own_socket(module_target: FakeTarget):
    """Default ``ETL_REUSE_PORT``: the kernel spreads connections over the workers' sockets."""
    with booted("transformers:Gate", module_target, workers=2) as server:
        workers = set(server.worker_pids())
        deadline = time.monotonic() + TIMEOUT  # healthy once the first worker listens
        while len(holders := listening_sockets(server.port)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(map(sorted, holders.values())) == sorted([pid] for pid in workers)
        conns = [connect(server) for _ in range(16)]  # all on one worker: p = 2 ** -15
        try:
            answered_by = set()
            for conn in conns:
                conn.request("PUT", "/o", body=b"x")
                with conn.getresponse() as resp:
                    answered_by.add(int(resp.read().split(b":")[0]))
        finally:
            for conn in conns:
                conn.close()
        assert "on a socket per worker (SO_REUSEPORT)" in server.log()
    assert answered_by == workers


def test_workers_share_one_socket_with_reuse_port_off(module_target: FakeTarget):
    with booted("transformers:Upper", module_target, workers=2, ETL_REUSE_PORT="0") as server:
        assert request(server, "PUT", "/o", b"x")[0::2] == (200, b"X")
        holders = listening_sockets(server.port)
        assert len(holders) == 1  # gunicorn's master bound it; the workers inherited it
        [pids] = holders.values()
        assert set(server.worker_pids()) <= pids
        assert "on one socket shared by the workers (ETL_REUSE_PORT is off)" in server.log()
