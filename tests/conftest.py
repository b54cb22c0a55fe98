"""Shared fixtures: the fake AIS target and a real ``gunicorn -c gunicorn.conf.py`` (gevent)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.fake_target import SECRET_PATH, FakeTarget

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


class GunicornServer:
    """``gunicorn -c gunicorn.conf.py APP`` on a pre-bound 127.0.0.1 socket (no port race).

    The listening socket is created here and handed over as ``fd://N``; start-up is awaited by
    polling ``/health`` with a deadline, failing early if the process exits.
    """

    def __init__(self, app: str, env: dict[str, str] | None = None, workers: int = 1) -> None:
        self.app = app
        self.extra_env = env or {}
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> GunicornServer:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ETL_", "AIS_")) and k not in ("NUM_WORKERS", "DIRECT_PUT")
        }
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
                "ETL_BIND": f"fd://{self.sock.fileno()}",
                "ETL_WORKERS": str(self.workers),
                "PYTHONWARNINGS": "default",
            }
        )
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), self.app]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=(self.sock.fileno(),),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGQUIT) -> int | None:
        """Stop the server: SIGQUIT (immediate) by default; SIGTERM to test graceful stops."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.sock.close()
        self._log.close()
        return self.proc.returncode if self.proc else None


@pytest.fixture
def fake_target() -> Iterator[FakeTarget]:
    with FakeTarget() as target:
        yield target


@pytest.fixture
def serve(fake_target: FakeTarget):
    """``serve("transformers:Upper", **env)`` -> a started GunicornServer; stopped at teardown.

    ``AIS_TARGET_URL`` points at ``fake_target`` with the PROTOCOL.md §10 secret path.
    """
    servers: list[GunicornServer] = []

    def start(app: str, workers: int = 1, **env: str) -> GunicornServer:
        if ":" in app and "(" not in app and not app.startswith("etl_wsgi."):
            app = f'etl_wsgi.app:create_app("{app}")'
        full_env = {"AIS_TARGET_URL": fake_target.url + SECRET_PATH, **env}
        server = GunicornServer(app, full_env, workers=workers)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
