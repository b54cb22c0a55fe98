"""Run the real server in a subprocess: for tests, benchmarks and local runs.

:class:`GunicornServer` starts ``gunicorn -c <config> <app>`` (gevent workers) on a port it
holds itself on 127.0.0.1, so there is no port race, then waits for ``/health`` with a deadline.
With one worker, or ``ETL_REUSE_PORT`` off, the socket listens and is handed over as ``fd://N``;
with several workers it only reserves the port (bound with ``SO_REUSEPORT``, never listening, so
it takes no connections) and the workers bind it themselves, as in a pod
(:func:`etl_wsgi.gunicorn_hooks.balance_listeners`). Only the standard library (and the pure
:mod:`etl_wsgi.config`) is used here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping

from etl_wsgi.config import FALSY

PACKAGE_CONFIG = "python:etl_wsgi.gunicorn_conf"

#: Variables the server reads; not inherited from the caller's environment unless given.
_OWN_PREFIXES = ("ETL_", "AIS_")
_OWN_NAMES = ("NUM_WORKERS", "DIRECT_PUT", "direct_put", "PROMETHEUS_MULTIPROC_DIR")


def _reuse_port(raw: str) -> bool:
    """``ETL_REUSE_PORT`` as the server reads it: on unless set to a false value."""
    return hasattr(socket, "SO_REUSEPORT") and raw.strip().lower() not in FALSY


class GunicornServer:
    """``gunicorn -c config app`` on a pre-bound 127.0.0.1 socket; stop with :meth:`stop`."""

    def __init__(
        self,
        app: str,
        env: Mapping[str, str] | None = None,
        workers: int = 1,
        *,
        config: str = PACKAGE_CONFIG,
        pythonpath: Iterable[str] = (),
        cwd: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.app = app
        self.extra_env = dict(env or {})
        self.workers = workers
        self.config = config
        self.pythonpath = list(pythonpath)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.sock = socket.socket()
        count = self.extra_env.get("ETL_WORKERS", "").strip()  # overrides ``workers``
        several = (int(count) if count.isdigit() else workers) > 1
        self.reuse_port = several and _reuse_port(self.extra_env.get("ETL_REUSE_PORT", ""))
        if self.reuse_port:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind((host, 0))
        if not self.reuse_port:
            self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._bind = f"{host}:{self.port}" if self.reuse_port else f"fd://{self.sock.fileno()}"

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_OWN_PREFIXES) and k not in _OWN_NAMES
        }
        path = [*self.pythonpath, env.get("PYTHONPATH", "")]
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(p for p in path if p),
                "ETL_BIND": self._bind,
                "ETL_WORKERS": str(self.workers),
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> GunicornServer:
        cmd = [sys.executable, "-m", "gunicorn", "-c", self.config, self.app]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.cwd,
            env=self.environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=() if self.reuse_port else (self.sock.fileno(),),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited {self.proc.returncode}:\n{self.log()}")
            if self._healthy():
                return self
            time.sleep(0.05)
        log = self.log()  # stop() closes the log file
        self.stop()
        raise RuntimeError(f"gunicorn not healthy after {timeout}s:\n{log}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def worker_pids(self) -> list[int]:
        """PIDs of the gunicorn workers (children of the master)."""
        if self.proc is None:
            return []
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        try:
            with open(path) as f:
                return [int(pid) for pid in f.read().split()]
        except OSError:
            return []

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGQUIT) -> int | None:
        """Stop the server: SIGQUIT (immediate) by default; SIGTERM for a graceful stop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.sock.close()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode if self.proc else None

    def __enter__(self) -> GunicornServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
