"""etl_wsgi.extension: an ETL inside an existing Flask app, at the root or under prefixes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask

from etl_wsgi.extension import ETLExtension
from tests.transformers import Inspect, Upper
from tests.unit_support import TARGET_URL, clear_settings_env, close_sessions


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    clear_settings_env(monkeypatch, AIS_TARGET_URL=TARGET_URL)
    host = Flask("host")

    @host.get("/hello")
    def hello() -> str:
        return "host route"

    yield host
    close_sessions(host)


def test_at_the_root_host_routes_keep_working(app: Flask) -> None:
    ext = ETLExtension(app, Upper)
    assert isinstance(ext.etl, Upper)
    assert app.extensions["etl_wsgi"] == {"/": ext.etl}
    client = app.test_client()
    assert client.get("/hello").data == b"host route"
    assert client.put("/hello", data=b"abc").data == b"ABC"  # PUT is the ETL's
    assert client.put("/obj", data=b"abc").data == b"ABC"
    assert client.get("/health").data == b"Running"


def test_two_etls_under_prefixes(app: Flask) -> None:
    ext = ETLExtension()
    upper = ext.init_app(app, etl=Upper, url_prefix="/upper")
    inspect = ext.init_app(app, etl="tests.transformers:Inspect", url_prefix="/inspect")
    assert isinstance(inspect, Inspect)
    assert app.extensions["etl_wsgi"] == {"/upper": upper, "/inspect": inspect}
    client = app.test_client()
    assert client.put("/upper/a", data=b"abc").data == b"ABC"
    assert client.put("/inspect/b/c?etl_args=q", data=b"x").data == b"bytes:x|b/c|q"
    assert client.get("/upper/health").data == b"Running"
    assert client.get("/hello").data == b"host route"
    assert client.put("/other/a", data=b"x").status_code == 404


def test_prefix_given_to_the_constructor(app: Flask) -> None:
    ETLExtension(app, Upper, url_prefix="/etl")
    assert list(app.extensions["etl_wsgi"]) == ["/etl"]
    assert app.test_client().put("/etl/a", data=b"z").data == b"Z"


def test_etl_class_from_app_config(app: Flask) -> None:
    app.config["ETL_CLASS"] = "tests.transformers:Upper"
    ext = ETLExtension(app)
    assert isinstance(ext.etl, Upper)
