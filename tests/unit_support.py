"""Constants and helpers shared by the tests; fixtures are in tests/conftest.py.

The PROTOCOL.md §10 values, the AIS target's ``etl_fqn`` encodings, the ``DST`` hop, an unused
port and object files serve the unit tests (tests/test_<module>.py) and the end-to-end tests
alike; tests/e2e_support.py adds what only the end-to-end tests need (gunicorn, the wire,
``/proc``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from tests.fake_target import SECRET_PATH, FakeTarget

#: PROTOCOL.md §10 fixture values.
TARGET_URL = "http://10.0.0.1:9080" + SECRET_PATH
SECRET = "s3cr3tABCD"
DST_PATH = "/ais%2F@%23%2Fdst%2Fa.txt"
DST_QUERY = "owt=3&uuid=XID1"
DST = "http://10.0.0.2:9080/ais%2F@%23%2Fdst%2Fa.txt?owt=3&uuid=XID1"
FQN_Q = "%252Fmp1%252F%40ais%252Fsrc%252F%2525ob%252Fhello.txt"
FQN_J = "%2Fmp1%2F@ais%2Fsrc%2F%25ob%2Fhello.txt"

_SETTING_NAMES = ("NUM_WORKERS", "DIRECT_PUT", "direct_put", "PROMETHEUS_MULTIPROC_DIR")


def path_escape(fs_path: str | os.PathLike[str]) -> str:
    """Go ``url.PathEscape`` of an FQN (§3): the ws control message's ``fqn`` (§6.2), and
    ``etl_fqn`` once query-decoded.  Keeps ``$ & + : = @``, escapes ``/`` and ``%``."""
    return quote(str(fs_path), safe="$&+:=@")


def fqn_query(fs_path: str | os.PathLike[str]) -> str:
    """``etl_fqn`` as the AIS target sends it: :func:`path_escape`, then query-encoded (§3).

    ``QueryEscape`` keeps only unreserved characters (``@`` -> ``%40``, ``%`` -> ``%25``).
    """
    return quote_plus(path_escape(fs_path), safe="")


def dst(target: FakeTarget, query: str = DST_QUERY) -> str:
    """The §10 ``DST`` hop (a destination target), on ``target``."""
    return f"{target.url}{DST_PATH}?{query}"


def closed_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_object(path: Path, data: bytes = b"hello") -> Path:
    """Create ``path`` (and its parent directories) holding ``data``; return it."""
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


def clear_settings_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Remove every etl-wsgi/AIS setting from ``os.environ``, then set ``env``."""
    for name in list(os.environ):
        if name.startswith(("AIS_", "ETL_")) or name in _SETTING_NAMES:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def close_sessions(app) -> None:
    """Close the outbound session of every ETL a Flask app serves (leaks fail the run)."""
    for etl in app.extensions.get("etl_wsgi", {}).values():
        etl.session.close()
