"""etl_wsgi.fastpath: ``create_app``'s direct WSGI path for object requests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from etl_wsgi.app import create_app
from etl_wsgi.extension import ETLExtension
from etl_wsgi.fastpath import EnvironRequest, ObjectRoutes
from tests.unit_support import TARGET_URL, clear_settings_env, close_sessions


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    clear_settings_env(monkeypatch, AIS_TARGET_URL=TARGET_URL)
    app = create_app("tests.transformers:Inspect")
    flask_seen: list[str] = []
    app.before_request(lambda: flask_seen.append("seen") and None)
    app.config["flask_seen"] = flask_seen
    yield app
    close_sessions(app)


def test_object_requests_bypass_flask_the_rest_does_not(app: Flask) -> None:
    assert isinstance(app.wsgi_app, ObjectRoutes)
    client = app.test_client()
    reply = client.put("/b/o.txt?etl_args=k", data=b"x")
    assert (reply.status_code, reply.data) == (200, b"bytes:x|b/o.txt|k")
    assert app.config["flask_seen"] == []
    assert client.get("/health").data == b"Running"
    assert app.config["flask_seen"] == ["seen"]


def test_other_methods_get_flasks_405_with_allow(app: Flask) -> None:
    reply = app.test_client().post("/b/o")
    assert reply.status_code == 405
    assert {"GET", "PUT"} <= set(reply.headers["Allow"].replace(" ", "").split(","))


def test_a_leading_slash_of_the_object_name_is_kept(app: Flask) -> None:
    # (the test client would read "//abs/o" as a host; gunicorn passes it as the path)
    reply = app.test_client().put("/", data=b"x", environ_overrides={"PATH_INFO": "//abs/o"})
    assert reply.data == b"bytes:x|/abs/o|"


def test_utf8_object_names_are_decoded(app: Flask) -> None:
    reply = app.test_client().put("/b/%C3%A9t%C3%A9", data=b"x")
    assert reply.data == "bytes:x|b/été|".encode()


def test_a_static_route_added_after_create_app_is_flasks(app: Flask) -> None:
    app.add_url_rule("/version", "version", lambda: "1.0")
    client = app.test_client()
    assert client.get("/version").data == b"1.0"
    assert client.put("/versionX", data=b"x").data == b"bytes:x|versionX|"


def test_a_variable_route_added_turns_the_direct_path_off(app: Flask) -> None:
    app.add_url_rule("/api/<name>", "api", lambda name: f"api {name}")
    client = app.test_client()
    assert client.get("/api/x").data == b"api x"
    assert client.put("/b/o", data=b"x").data == b"bytes:x|b/o|"
    assert app.config["flask_seen"] == ["seen", "seen"]


def test_errors_take_the_one_error_table(app: Flask) -> None:
    reply = app.test_client().put("/b/o", data=b"x", headers={"Ais-Node-Url": "ftp://x/y"})
    assert reply.status_code == 400
    assert reply.is_json and "error" in reply.json


def wire_headers(reply) -> dict[str, str]:
    return {k: v for k, v in reply.headers.items() if k != "Date"}


def test_plain_replies_carry_the_blueprints_headers_and_free_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The direct path writes 200s without a Response: same headers as the Flask extension."""
    clear_settings_env(monkeypatch, AIS_TARGET_URL=TARGET_URL)
    direct = create_app("tests.transformers:Upper")
    extension = Flask("host")
    ETLExtension(extension, "tests.transformers:Upper")
    try:
        got = {}
        for name, app in (("direct", direct), ("extension", extension)):
            reply = app.test_client().put("/b/o.txt?etl_args=k", data=b"hello")
            got[name] = (reply.status, wire_headers(reply), reply.data)
            (etl,) = app.extensions["etl_wsgi"].values()
            assert etl.memory_budget.held == 10  # input and output, until the body is closed
            reply.close()
            assert etl.memory_budget.held == 0  # released when the body was closed
        assert got["direct"] == got["extension"]
        assert got["direct"][0] == "200 OK"
        assert got["direct"][1] == {
            "Content-Type": "application/octet-stream",
            "Content-Length": "5",
        }
    finally:
        close_sessions(direct)
        close_sessions(extension)


# --- EnvironRequest: Werkzeug's values, without a Werkzeug Request on the common path ---------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"CONTENT_LENGTH": "0"},
        {"CONTENT_LENGTH": " 17 "},
        {"CONTENT_LENGTH": "-3"},
        {"CONTENT_LENGTH": "x1"},
        {"CONTENT_LENGTH": "5", "HTTP_TRANSFER_ENCODING": "chunked"},
        {"CONTENT_LENGTH": "5", "HTTP_TRANSFER_ENCODING": "gzip, Chunked"},
        {"HTTP_TRANSFER_ENCODING": "gzip"},
        {"REQUEST_METHOD": "put"},
        {"QUERY_STRING": "etl_args=a%20b&etl_args=2&etl_fqn=%2Fm%2Fo&x=%ff&y"},
    ],
)
def test_environ_request_answers_as_werkzeug_does(overrides: dict[str, str]) -> None:
    environ = EnvironBuilder("/b/o", method="PUT").get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update(overrides)
    light, full = EnvironRequest(environ), Request(environ)
    assert light.method == full.method
    assert light.content_length == full.content_length
    assert light.max_content_length is full.max_content_length is None
    assert list(light.args.items(multi=True)) == list(full.args.items(multi=True))
    assert light.path == full.path


def test_environ_request_builds_a_werkzeug_request_only_when_asked() -> None:
    environ = EnvironBuilder("/b/o", method="PUT", data=b"abc").get_environ()
    light = EnvironRequest(environ)
    assert (light.method, light.content_length) == ("PUT", 3)
    assert light._full is None
    assert light.stream.read() == b"abc"
    assert isinstance(light._full, Request)
    assert light.full is light._full  # built once


def test_a_query_string_still_reaches_the_transform(app: Flask) -> None:
    reply = app.test_client().put("/b/o?etl_args=%20k%20&etl_args=2&other=1", data=b"x")
    assert reply.data == b"bytes:x|b/o|k"  # the first value, stripped (PROTOCOL.md 2.4)
