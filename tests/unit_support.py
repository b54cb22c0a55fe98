"""Constants and helpers shared by the unit tests (tests/test_<module>.py); fixtures are in
tests/unit_fixtures.py."""

from __future__ import annotations

import os
import socket

import pytest

from tests.fake_target import SECRET_PATH

#: PROTOCOL.md §10 fixture values.
TARGET_URL = "http://10.0.0.1:9080" + SECRET_PATH
SECRET = "s3cr3tABCD"
DST = "http://10.0.0.2:9080/ais%2F@%23%2Fdst%2Fa.txt?owt=3&uuid=XID1"
FQN_Q = "%252Fmp1%252F%40ais%252Fsrc%252F%2525ob%252Fhello.txt"
FQN_J = "%2Fmp1%2F@ais%2Fsrc%2F%25ob%2Fhello.txt"

_SETTING_NAMES = ("NUM_WORKERS", "DIRECT_PUT", "direct_put")


def clear_settings_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Remove every etl-wsgi/AIS setting from ``os.environ``, then set ``env``."""
    for name in list(os.environ):
        if name.startswith(("AIS_", "ETL_")) or name in _SETTING_NAMES:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def closed_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def close_sessions(app) -> None:
    """Close the outbound session of every ETL a Flask app serves (leaks fail the run)."""
    for etl in app.extensions.get("etl_wsgi", {}).values():
        etl.session.close()
