"""Helpers for the end-to-end tests (tests/test_e2e_*.py: a real gunicorn, a fake target).

No fixtures here: plain functions over a :class:`tests.conftest.GunicornServer`, the wire and
``/proc``.  Every wait is bounded by a deadline.  The §10 values and the ``etl_fqn`` encodings
shared with the unit tests are in tests/unit_support.py.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

from tests.conftest import GunicornServer
from tests.fake_target import SECRET_PATH, FakeTarget

TIMEOUT = 30.0
MIB = 1 << 20
K = TypeVar("K")


@contextmanager
def booted(app: str, target: FakeTarget, workers: int = 1, **env: str) -> Iterator[GunicornServer]:
    """A started gunicorn serving ``app`` (``"mod:Class"`` goes through ``create_app``)."""
    if ":" in app and "(" not in app:
        app = f'etl_wsgi.app:create_app("{app}")'
    server = GunicornServer(app, {"AIS_TARGET_URL": target.url + SECRET_PATH, **env}, workers)
    try:
        yield server.start()
    finally:
        server.stop()


@contextmanager
def booted_many(
    apps: Mapping[K, str], target: FakeTarget, **env: str
) -> Iterator[dict[K, GunicornServer]]:
    """Several servers (``key -> "mod:Class"``, same ``env``), booted in parallel."""
    full_env = {"AIS_TARGET_URL": target.url + SECRET_PATH, **env}
    servers = {
        key: GunicornServer(f'etl_wsgi.app:create_app("{app}")', full_env)
        for key, app in apps.items()
    }
    with ExitStack() as stack:
        for server in servers.values():
            stack.callback(server.stop)
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(GunicornServer.start, servers.values()))
        yield servers


def connect(server: GunicornServer, timeout: float = TIMEOUT) -> http.client.HTTPConnection:
    """An ``http.client`` connection: the request line goes on the wire exactly as given."""
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)


def request(
    server: GunicornServer,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection, closed afterwards: ``(status, headers, body)``."""
    conn = connect(server)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        with resp:
            return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def send_raw(server: GunicornServer, raw: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send ``raw`` byte for byte, half-close (the client sends nothing more), read to EOF."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        for _ in range(100_000):  # bounded; ends at EOF
            try:
                data = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not data:
                break
            reply += data
    return reply


def split_reply(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers with lower-case names, body as sent)`` of one raw HTTP/1.x answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), raw[:200]
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def wait_for_file(path: Path, timeout: float = TIMEOUT) -> str:
    """Poll (bounded) until ``path`` exists; return its text.  Markers are created by rename."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)
    return path.read_text()


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of ``pid`` so far (``VmHWM``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")
