"""etl_wsgi.flask_server: drop-in for aistore's ``FlaskServer`` (``.app``, no bind on construct)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from etl_wsgi import FlaskServer
from tests.transformers import UpperFlask
from tests.unit_support import TARGET_URL, clear_settings_env


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings_env(monkeypatch, AIS_TARGET_URL=TARGET_URL)


@pytest.fixture
def server(env) -> Iterator[UpperFlask]:
    srv = UpperFlask()
    yield srv
    srv.session.close()


def test_app_serves_the_transformer(server: UpperFlask) -> None:
    assert (server.host, server.port) == ("0.0.0.0", 8000)
    assert server.app.extensions["etl_wsgi"] == {"/": server}
    client = server.app.test_client()
    assert client.get("/health").data == b"Running"
    assert client.put("/a", data=b"abc").data == b"ABC"


def test_host_and_port(env) -> None:
    srv = UpperFlask(host="127.0.0.1", port=9000)
    try:
        assert (srv.host, srv.port) == ("127.0.0.1", 9000)
    finally:
        srv.session.close()


def test_flask_server_without_transform_is_a_type_error(env) -> None:
    with pytest.raises(TypeError, match="must override either transform"):
        FlaskServer()
