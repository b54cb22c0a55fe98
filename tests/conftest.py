"""Shared fixtures: the fake AIS target and a real ``gunicorn -c gunicorn.conf.py`` (gevent)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from etl_wsgi.testing import GunicornServer as _GunicornServer
from tests.fake_target import SECRET_PATH, FakeTarget

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


class GunicornServer(_GunicornServer):
    """The package's launcher, pointed at the repository's ``gunicorn.conf.py`` and test modules."""

    def __init__(self, app: str, env: dict[str, str] | None = None, workers: int = 1) -> None:
        super().__init__(
            app,
            {"PYTHONWARNINGS": "default", **(env or {})},
            workers,
            config=str(ROOT / "gunicorn.conf.py"),
            pythonpath=[str(TESTS), str(ROOT)],
            cwd=str(ROOT),
        )


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
