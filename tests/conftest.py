"""Shared fixtures: the fake AIS target and a real ``gunicorn -c gunicorn.conf.py`` (gevent).

``fake_target`` is a fresh :class:`FakeTarget` per test; ``module_target`` is one per test module
and ``target`` is that one reset before each test.  A FakeTarget costs ~0.5 s to shut down
(``serve_forever`` polls twice a second), which would dominate a fast unit suite if every test
started its own, and module-scoped servers need a target that lives as long as they do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from etl_wsgi.testing import GunicornServer as _GunicornServer
from tests.fake_target import SECRET_PATH, FakeTarget
from tests.unit_support import TARGET_URL, clear_settings_env, write_object

if TYPE_CHECKING:
    from etl_wsgi.base_etl_server import ETLServer

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


@pytest.fixture(scope="module")
def module_target() -> Iterator[FakeTarget]:
    """One FakeTarget per test module, as it is (module-scoped servers point at it)."""
    with FakeTarget() as fake:
        yield fake


@pytest.fixture
def target(module_target: FakeTarget) -> FakeTarget:
    """The module's FakeTarget with no objects, no script, ``Reply(200)`` and nothing recorded."""
    module_target.reset()
    return module_target


@pytest.fixture
def etl_target_url() -> str:
    """``AIS_TARGET_URL`` of the ETLs ``make`` builds: the §10 one, where nothing listens.

    A module overrides this fixture to point them at a FakeTarget.
    """
    return TARGET_URL


@pytest.fixture
def make(
    monkeypatch: pytest.MonkeyPatch, etl_target_url: str
) -> Iterator[Callable[..., ETLServer]]:
    """``make(cls, **env)``: construct with a clean environment; sessions closed at teardown."""
    made: list[ETLServer] = []

    def build(cls: type[ETLServer], **env: str) -> ETLServer:
        clear_settings_env(monkeypatch, **{"AIS_TARGET_URL": etl_target_url, **env})
        etl = cls()
        made.append(etl)
        return etl

    yield build
    for etl in made:
        etl.session.close()


@pytest.fixture
def obj(tmp_path: Path) -> Path:
    """An object file ``<tmp_path>/@ais/src/%ob/hello.txt`` holding ``hello``."""
    return write_object(tmp_path / "@ais" / "src" / "%ob" / "hello.txt")
