"""etl_wsgi.app: ``resolve_etl`` and the ``create_app`` gunicorn entry point."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest
from flask import Flask

from etl_wsgi.app import create_app, resolve_etl
from etl_wsgi.base_etl_server import ETLServer
from etl_wsgi.config import ConfigError
from tests.transformers import Upper, UpperFlask
from tests.unit_support import TARGET_URL, clear_settings_env, close_sessions


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    clear_settings_env(monkeypatch, AIS_TARGET_URL=TARGET_URL)
    return monkeypatch


@pytest.fixture
def resolved(env) -> Iterator[Callable[..., ETLServer]]:
    made: list[ETLServer] = []

    def resolve(spec: object = None) -> ETLServer:
        etl = resolve_etl(spec)
        made.append(etl)
        return etl

    yield resolve
    for etl in made:
        etl.session.close()


def test_resolve_a_class(resolved) -> None:
    assert type(resolved(Upper)) is Upper


def test_resolve_an_instance_is_kept(resolved) -> None:
    etl = resolved(Upper)
    assert resolved(etl) is etl


@pytest.mark.parametrize("spec", ["tests.transformers:Upper", "  tests.transformers.Upper  "])
def test_resolve_an_import_string(resolved, spec: str) -> None:
    assert type(resolved(spec)) is Upper


def test_resolve_a_module_level_instance(resolved, env, tmp_path) -> None:
    (tmp_path / "etl_instance_mod.py").write_text(
        "from tests.transformers import Upper\nserver = Upper()\n"
    )
    env.syspath_prepend(str(tmp_path))
    env.delitem(sys.modules, "etl_instance_mod", raising=False)
    etl = resolved("etl_instance_mod:server")
    assert etl is sys.modules["etl_instance_mod"].server


def test_resolve_from_etl_class_setting(resolved, env) -> None:
    env.setenv("ETL_CLASS", "tests.transformers:Upper")
    assert type(resolved()) is Upper


def test_resolve_without_anything_names_the_ways_to_fix_it(env) -> None:
    with pytest.raises(ConfigError, match=r"ETL_CLASS=pkg\.mod:MyETL"):
        resolve_etl()


@pytest.mark.parametrize("spec", ["tests.transformers:Nope", "no_such_module_xyz:X"])
def test_resolve_bad_import_string(env, spec: str) -> None:
    with pytest.raises(ConfigError, match="Cannot import ETL class"):
        resolve_etl(spec)


@pytest.mark.parametrize("spec", [42, "tests.transformers:make_flask_app", dict])
def test_resolve_something_else_is_a_type_error(env, spec: object) -> None:
    with pytest.raises(TypeError, match="is not an ETLServer subclass or instance"):
        resolve_etl(spec)


def test_resolve_needs_the_target_url(monkeypatch) -> None:
    clear_settings_env(monkeypatch)
    with pytest.raises(ConfigError, match="AIS_TARGET_URL"):
        resolve_etl(Upper)


def test_create_app_serves_at_the_root(env) -> None:
    app = create_app("tests.transformers:Upper")
    try:
        assert isinstance(app, Flask)
        assert list(app.extensions["etl_wsgi"]) == ["/"]
        client = app.test_client()
        assert client.get("/health").data == b"Running"
        assert client.put("/a", data=b"abc").data == b"ABC"
    finally:
        close_sessions(app)


def test_create_app_returns_a_flask_servers_own_app(env) -> None:
    app = create_app(UpperFlask)
    try:
        server = app.extensions["etl_wsgi"]["/"]
        assert isinstance(server, UpperFlask)
        assert server.app is app
        assert app.test_client().put("/a", data=b"abc").data == b"ABC"
    finally:
        close_sessions(app)
