"""The ``etl-wsgi`` command (etl_wsgi/cli.py, etl_wsgi/localrun.py, etl_wsgi/gunicorn_app.py).

Usage errors and ``check`` run in-process with click's CliRunner.  ``run`` runs end to end as
``python -m etl_wsgi run`` in a subprocess (real gunicorn gevent workers, the stand-in target on
127.0.0.1); the direct-put cases drive :func:`etl_wsgi.localrun.running` in-process so they can
see what the stand-in target received.  ``serve`` boots on a pre-bound 127.0.0.1 socket
(``fd://N``), answers a PUT and stops on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from etl_wsgi import localrun
from etl_wsgi.cli import main
from tests.conftest import ROOT, TESTS
from tests.e2e_support import wait_for_file
from tests.unit_support import TARGET_URL, clear_settings_env

TIMEOUT = 120.0
MIB = 1 << 20

#: Object name -> content; names with characters the wire escapes, a nested one, binary, empty.
OBJECTS = {
    "hello.txt": b"hello",
    "dir/sub/deep.txt": b"deep inside",
    "odd name #1 %41 @x+y.txt": b"escaped on the wire",
    "bin/blob.bin": bytes(range(256)) * 8,
    "empty.txt": b"",
}


def upper(data: bytes) -> bytes:
    return data.upper()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for name, data in OBJECTS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ETL_/AIS_ settings from the caller; tests/ importable (``transformers:Upper``)."""
    clear_settings_env(monkeypatch)
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    return monkeypatch


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "AIS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
    env["ETL_WORKERS"] = "1"
    env.update(extra)
    return env


def etl_wsgi(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m etl_wsgi ARGS`` from the repository root, bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "etl_wsgi", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- run: end to end in a subprocess -----------------------------------------------------------


@pytest.mark.parametrize(
    "comm, fqn",
    [
        ("hpush", "--fqn"),
        ("hpush", "--no-fqn"),
        ("hpull", "--fqn"),
        ("hpull", "--no-fqn"),
        ("ws", "--fqn"),
        ("ws", "--no-fqn"),
    ],
)
def test_run_transforms_every_object(src: Path, tmp_path: Path, comm: str, fqn: str) -> None:
    dst = tmp_path / "dst"
    proc = etl_wsgi("run", "transformers:Upper", "--src", str(src), "--dst", str(dst),
                    "--comm", comm, fqn, "--jobs", "3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert tree(dst) == {name: upper(data) for name, data in OBJECTS.items()}
    assert f"{len(OBJECTS)}/{len(OBJECTS)} objects transformed" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "comm, expected_path",
    [("hpush", "src/hello.txt"), ("hpull", "ais/@#/src/hello.txt"), ("ws", "hello.txt")],
)
def test_run_passes_etl_args_and_path_as_ais_does(
    src: Path, tmp_path: Path, comm: str, expected_path: str
) -> None:
    """§2.4 etl_args; §2.5 the path each transport hands to transform(); §3 FQN -> bytes."""
    dst = tmp_path / "dst"
    proc = etl_wsgi("run", "transformers:Inspect", "--src", str(src), "--dst", str(dst),
                    "--comm", comm, "--etl-args", " a b&c=d ")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (dst / "hello.txt").read_bytes() == f"bytes:hello|{expected_path}|a b&c=d".encode()


def test_run_with_direct_fqn_hands_the_local_path(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    proc = etl_wsgi("run", "transformers:Inspect", "--src", str(src), "--dst", str(dst),
                    ETL_DIRECT_FQN="true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (dst / "hello.txt").read_bytes() == f"str:{src / 'hello.txt'}|src/hello.txt|".encode()


@pytest.mark.parametrize(
    "comm, message", [("hpush", "HTTP 500: bad"), ("ws", "WebSocket closed by the ETL: 1011 bad")]
)
def test_run_reports_a_failed_object_and_exits_non_zero(
    src: Path, tmp_path: Path, comm: str, message: str
) -> None:
    (src / "boom.txt").write_bytes(b"boom")  # transformers.Upper raises ValueError("bad")
    dst = tmp_path / "dst"
    proc = etl_wsgi("run", "transformers:Upper", "--src", str(src), "--dst", str(dst),
                    "--comm", comm, "--no-fqn", "--jobs", "1")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert f"{len(OBJECTS)}/{len(OBJECTS) + 1} objects transformed" in proc.stdout
    assert f"1 failed:\n  boom.txt: {message}\n" in proc.stderr
    assert tree(dst) == {name: upper(data) for name, data in OBJECTS.items()}
    assert "Traceback" not in proc.stderr


def test_run_class_that_cannot_start_is_one_clear_line(src: Path, tmp_path: Path) -> None:
    proc = etl_wsgi("run", "etl_wsgi:ETLServer", "--src", str(src), "--dst", str(tmp_path / "d"))
    assert proc.returncode == 1
    assert "the server did not start: TypeError: ETLServer must override" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- run: direct put, in-process to see what the stand-in target received --------------------


@pytest.mark.parametrize("comm, fqn", [("hpush", False), ("hpull", True), ("ws", True)])
def test_direct_put_lands_in_dst_through_the_stand_in_target(
    src: Path, tmp_path: Path, clean_env: pytest.MonkeyPatch, comm: str, fqn: bool
) -> None:
    """§4.1-§4.3: Ais-Node-Url names the stand-in; the ETL PUTs there and answers 204/text."""
    job = localrun.Job(src, tmp_path / "dst", comm, fqn, direct_put=True, jobs=2)
    objects = localrun.list_objects(src)
    seen: list[localrun.Outcome] = []
    with localrun.running(job, "transformers:Upper", workers=1, environ={}) as server:
        summary = server.transform(objects, seen.append)
        delivered = dict(server.target.delivered)
    assert summary.failures == []
    assert delivered == {name: len(data) for name, data in OBJECTS.items()}
    assert tree(job.dst) == {name: upper(data) for name, data in OBJECTS.items()}
    assert sorted(o.obj.name for o in seen) == sorted(OBJECTS)
    assert summary.bytes_out == summary.bytes_in == sum(map(len, OBJECTS.values()))


def test_stand_in_target_refuses_names_outside_dst(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid object name"):
        localrun.destination(tmp_path, "a/../../etc/passwd")
    target = localrun.LocalTarget(tmp_path, tmp_path)
    try:
        with pytest.raises(ValueError, match="not an ETL object path"):
            target.object_name("/v1/etl/_object/other/secret/ais%2F@%23%2Fdst%2Fa", "dst")
        assert target.object_name(localrun.SECRET_PATH + "/ais%2F@%23%2Fdst%2Fa%20b", "dst") == (
            "a b"
        )
    finally:
        target.server.server_close()


# ---- usage errors and check: in-process -------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["transformers:Nope"], "cannot import 'transformers:Nope'"),
        (["no_such_module:X"], "No module named 'no_such_module'"),
        (["transformers"], "expected pkg.module:Class"),
        (["tests.unit_support:TARGET_URL"], "is not an ETLServer subclass"),
        (["transformers:Upper", "--workers", "0"], "'0': expected a positive integer"),
        (["transformers:Upper", "--comm", "udp"], "'udp' is not one of"),
    ],
)
def test_run_usage_errors(
    clean_env: pytest.MonkeyPatch, src: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    code, output = invoke("run", *args, "--src", str(src), "--dst", str(tmp_path / "dst"))
    assert code == 2
    assert message in output
    assert not (tmp_path / "dst").exists()


def test_run_src_and_dst_errors(clean_env: pytest.MonkeyPatch, src: Path, tmp_path: Path) -> None:
    code, output = invoke("run", "transformers:Upper", "--src", str(tmp_path / "none"),
                          "--dst", str(tmp_path / "dst"))  # fmt: skip
    assert code == 2
    assert "does not exist" in output
    code, output = invoke("run", "transformers:Upper", "--src", str(src), "--dst", str(src / "o"))
    assert code == 2
    assert "must not be --src or inside it" in output
    code, output = invoke("run", "transformers:Upper", "--dst", str(tmp_path))
    assert code == 2
    assert "Missing option '--src'" in output


def test_check_reports_what_serve_would_run(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AIS_TARGET_URL", TARGET_URL)
    clean_env.setenv("ETL_KEEPALIVE", "17")
    code, output = invoke("check", "transformers:UpperStream", "--workers", "3", "--bind",
                          "127.0.0.1:9999")  # fmt: skip
    assert code == 0, output
    assert "transformers.UpperStream: streaming (transform_stream)" in output
    assert "gunicorn bind        127.0.0.1:9999" in output
    assert "gunicorn workers     3 x gevent" in output
    assert "keep-alive 17s" in output
    assert "ETL_WORKERS              3 (from --workers)" in output
    assert "ETL_KEEPALIVE            17 (from ETL_KEEPALIVE)" in output
    assert "ETL_WORKER_TIMEOUT       120 (default)" in output
    assert "s3cr3tABCD" not in output  # the per-ETL secret is redacted


@pytest.mark.parametrize(
    "env, args, message",
    [
        ({}, [], "'AIS_TARGET_URL' must be set"),
        ({"AIS_TARGET_URL": TARGET_URL, "ETL_WORKERS": "x"}, [], "ETL_WORKERS='x'"),
        ({"AIS_TARGET_URL": TARGET_URL}, ["--keepalive", "-1"], "'-1': expected a non-negative"),
    ],
)
def test_check_names_the_bad_setting(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], args: list[str], message: str
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    code, output = invoke("check", "transformers:Upper", *args)
    assert code != 0
    assert message in output


def test_check_rejects_a_class_without_transform(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AIS_TARGET_URL", TARGET_URL)
    code, output = invoke("check", "etl_wsgi:ETLServer")
    assert code == 1
    assert "must override either transform() or transform_stream()" in output


def test_cli_module_does_not_import_requests() -> None:
    """``serve`` is the gunicorn master: requests/ssl must wait for gevent's patching."""
    code = (
        "import sys, etl_wsgi.cli, etl_wsgi.gunicorn_app; "
        "bad = [m for m in ('requests', 'flask', 'etl_wsgi.base_etl_server') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT, env=child_env())


# ---- serve ------------------------------------------------------------------------------------


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"etl-wsgi serve exited {proc.returncode}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise AssertionError(f"etl-wsgi serve not healthy within {timeout}s")


def test_serve_answers_a_put_and_stops_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with open(tmp_path / "serve.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "etl_wsgi", "serve", "transformers:Upper",
                 "--bind", f"fd://{sock.fileno()}", "--workers", "1"],
                cwd=ROOT, env=child_env(AIS_TARGET_URL=TARGET_URL), stdout=log,
                stderr=subprocess.STDOUT, pass_fds=(sock.fileno(),),
            )  # fmt: skip
            try:
                wait_healthy(url, proc)
                req = urllib.request.Request(url + "/b/o.txt", data=b"hello etl", method="PUT")
                with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                    assert (resp.status, resp.read()) == (200, b"HELLO ETL")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(TIMEOUT) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    text = (tmp_path / "serve.log").read_text()
    assert "Using worker: gevent" in text
    assert "was imported in the gunicorn master" not in text  # when_ready's requests check


def test_serve_bad_setting_is_a_usage_error(clean_env: pytest.MonkeyPatch) -> None:
    code, output = invoke("serve", "transformers:Upper", "--bind", "nowhere")
    assert code == 2
    assert "expected HOST:PORT, unix:PATH or fd://N" in output


def test_console_script_is_the_click_group() -> None:
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="etl-wsgi")
    assert script.value == "etl_wsgi.cli:main"
    assert script.load() is main


@pytest.mark.parametrize("comm", ["hpush", "ws"])
def test_run_streams_a_large_object_both_ways_at_once(tmp_path: Path, comm: str) -> None:
    """A streaming transform answers while its input still arrives (PROTOCOL.md §5): the runner
    reads the reply while it sends, or both sides would block on full socket buffers."""
    src = tmp_path / "src"
    src.mkdir()
    data = bytes(range(97, 123)) * (24 * MIB // 26)
    (src / "large.txt").write_bytes(data)
    dst = tmp_path / "dst"
    proc = etl_wsgi("run", "transformers:UpperStream", "--src", str(src), "--dst", str(dst),
                    "--comm", comm, "--no-fqn")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (dst / "large.txt").read_bytes() == data.upper()


def test_run_stops_its_server_on_sigterm(src: Path, tmp_path: Path) -> None:
    """SIGTERM (a CI timeout) unwinds: the in-flight object is abandoned, gunicorn is stopped."""
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl_wsgi", "run", "transformers:MarkedSleep", "--src", str(src),
         "--dst", str(tmp_path / "dst"), "--jobs", "1", "--etl-args", f"{marks},{TIMEOUT * 2}"],
        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    children: list[int] = []
    try:
        wait_for_file(marks / "started", TIMEOUT)  # a transform is in flight
        children = [
            int(pid)
            for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:  # the test failed: leave no server behind
            for pid in children:
                os.kill(pid, signal.SIGQUIT)
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert children != []
    for pid in children:
        assert gone_within(pid, TIMEOUT), f"gunicorn master {pid} still runs"


def gone_within(pid: int, timeout: float) -> bool:
    """Bounded wait until ``pid`` no longer exists (or is a zombie awaiting its reaper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False
