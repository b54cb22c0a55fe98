"""Flask embedding: ``ETLExtension`` in a host app, the ``FlaskServer`` drop-in, ``create_app``.

Served by the real ``gunicorn -k gevent`` where the wire matters (host routes next to ETL
routes, prefixes, object paths with ``//``); ``create_app`` / ``init_app`` argument forms are
checked in-process with Flask's test client.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from etl_wsgi import ConfigError, ETLExtension, ETLServer, FlaskServer, create_app
from tests import transformers
from tests.conftest import GunicornServer
from tests.e2e_support import booted, request
from tests.fake_target import SECRET_PATH, FakeTarget
from tests.unit_support import closed_port, fqn_query, write_object

TARGET_URL = "http://127.0.0.1:9" + SECRET_PATH


@pytest.fixture(scope="module")
def hostapp(module_target: FakeTarget) -> Iterator[GunicornServer]:
    """``hostapp:make_app()``: host routes, ``Upper`` at ``/etl``, ``Inspect`` at ``/inspect``."""
    with booted("hostapp:make_app()", module_target) as server:
        yield server


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """In-process settings: only ``AIS_TARGET_URL`` (nothing listens there)."""
    for name in ("ETL_CLASS", "ETL_DIRECT_FQN", "AIS_DIRECT_PUT_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIS_TARGET_URL", TARGET_URL)
    return monkeypatch


def assert_vector2(status: int, headers, body: bytes) -> None:
    """PROTOCOL.md §10 #2: 200, octet-stream, Content-Length 5, HELLO."""
    assert status == 200
    assert headers.get("Content-Type") == "application/octet-stream"
    assert headers.get("Content-Length") == "5"
    assert body == b"HELLO"


# ---- ETLExtension in a host app, under gunicorn ------------------------------------------------


def test_host_routes_still_answer(hostapp: GunicornServer):
    assert request(hostapp, "GET", "/")[0::2] == (200, b"host index")
    assert request(hostapp, "GET", "/hello")[0::2] == (200, b"host hello")
    assert request(hostapp, "GET", "/health")[0::2] == (200, b"host healthy")
    status, _, body = request(hostapp, "PUT", "/api/items/x", b"abc")
    assert (status, json.loads(body)) == (200, {"name": "x", "size": 3})
    # no ETL at the root: an object path there is not served
    assert request(hostapp, "PUT", "/src/a.txt", b"hello")[0] == 404


@pytest.mark.parametrize("prefix", ["/etl", "/inspect"])
def test_prefixed_etl_health(hostapp: GunicornServer, prefix: str):
    assert request(hostapp, "GET", prefix + "/health")[0::2] == (200, b"Running")


def test_prefixed_etl_transforms(hostapp: GunicornServer):
    assert_vector2(*request(hostapp, "PUT", "/etl/src/a.txt", b"hello"))
    status, _, body = request(hostapp, "PUT", "/inspect/src/a.txt?etl_args=x", b"hello")
    # the prefix is not part of the object path
    assert (status, body) == (200, b"bytes:hello|src/a.txt|x")


def test_prefixed_etl_maps_its_errors(hostapp: GunicornServer, tmp_path: Path):
    status, headers, body = request(hostapp, "PUT", "/etl/src/a.txt", b"boom")
    assert (status, json.loads(body)) == (500, {"error": "bad"})
    assert headers.get("Content-Type") == "application/json"
    gone = tmp_path / "gone"
    status, _, body = request(hostapp, "PUT", f"/etl/src/gone.txt?etl_fqn={fqn_query(gone)}")
    assert status == 404
    assert str(gone) in json.loads(body)["error"]


def test_root_etl_behind_host_routes(module_target: FakeTarget):
    with booted("hostapp:make_root_app()", module_target) as server:
        assert request(server, "GET", "/hello")[0::2] == (200, b"host hello")
        assert request(server, "GET", "/")[0::2] == (200, b"host index")
        status, _, body = request(server, "PUT", "/api/items/y", b"ab")
        assert (status, json.loads(body)) == (200, {"name": "y", "size": 2})
        assert request(server, "GET", "/health")[0::2] == (200, b"Running")
        assert_vector2(*request(server, "PUT", "/src/hello.txt", b"hello"))


# ---- paths reach transform() unchanged ---------------------------------------------------------


#: Object paths as sent on the wire -> the ``path`` transform() must get.
ODD_PATHS = [
    ("/src//a//b.txt", "src//a//b.txt"),
    ("/src/dir/", "src/dir/"),
    ("/src//dir//", "src//dir//"),
]


@pytest.mark.parametrize(
    ("app", "prefix"),
    [("transformers:Inspect", ""), ("hostapp:make_app()", "/inspect")],
    ids=["root", "prefixed"],
)
def test_double_slash_and_trailing_slash_reach_transform(
    module_target: FakeTarget, app: str, prefix: str
):
    """No merge, no redirect (Werkzeug would 308 on ``//`` with ``merge_slashes``)."""
    with booted(app, module_target) as server:
        for wire, path in ODD_PATHS:
            status, headers, body = request(server, "PUT", prefix + wire, b"x")
            assert headers.get("Location") is None
            assert (status, body) == (200, f"bytes:x|{path}|".encode())
            status, _, body = request(server, "GET", f"{prefix}{wire}?etl_fqn={fqn_query('/nope')}")
            assert status == 404
            assert path in json.loads(body)["error"]


# ---- FlaskServer drop-in -----------------------------------------------------------------------


def test_flask_server_app_under_gunicorn(module_target: FakeTarget, tmp_path: Path):
    """``transformers:make_flask_app()`` (a ``FlaskServer`` subclass's ``.app``): §10 #2, #3."""
    obj = write_object(tmp_path / "mp1" / "@ais" / "src" / "%ob" / "hello.txt")
    with booted("transformers:make_flask_app()", module_target) as server:
        assert request(server, "GET", "/health")[0::2] == (200, b"Running")
        assert_vector2(*request(server, "PUT", "/src/hello.txt", b"hello"))
        status, _, body = request(
            server, "PUT", f"/src/hello.txt?etl_fqn={fqn_query(obj)}&etl_args=x", b""
        )
        assert (status, body) == (200, b"HELLO")


def test_flask_server_construction_does_not_bind(env: pytest.MonkeyPatch):
    port = closed_port()
    server = transformers.UpperFlask("127.0.0.1", port)
    assert isinstance(server, FlaskServer)
    assert (server.host, server.port) == ("127.0.0.1", port)
    with socket.socket() as probe:  # nobody listens ...
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    with socket.socket() as sock:  # ... and the port is still free to bind
        sock.bind(("127.0.0.1", port))
    resp = server.app.test_client().put("/src/hello.txt", data=b"hello")
    assert_vector2(resp.status_code, resp.headers, resp.data)


# ---- create_app / init_app forms, in-process ---------------------------------------------------


def put_hello(app: Flask, path: str = "/src/hello.txt") -> tuple[int, bytes]:
    resp = app.test_client().put(path, data=b"hello")
    return resp.status_code, resp.data


@pytest.mark.parametrize(
    "spec",
    [
        transformers.Upper,
        "tests.transformers:Upper",
        " tests.transformers:Upper ",
        "tests.transformers.Upper",
    ],
    ids=["subclass", "string", "string-padded", "dotted-string"],
)
def test_create_app_accepts(env: pytest.MonkeyPatch, spec):
    app = create_app(spec)
    assert put_hello(app) == (200, b"HELLO")
    assert app.test_client().get("/health").data == b"Running"


def test_create_app_accepts_an_instance(env: pytest.MonkeyPatch):
    etl = transformers.Upper()
    app = create_app(etl)
    assert app.extensions["etl_wsgi"]["/"] is etl
    assert put_hello(app) == (200, b"HELLO")


def test_create_app_with_a_flask_server_returns_its_app(env: pytest.MonkeyPatch):
    server = transformers.UpperFlask()
    assert create_app(server) is server.app
    assert isinstance(create_app(transformers.UpperFlask), Flask)


def test_create_app_without_argument_uses_etl_class(env: pytest.MonkeyPatch):
    env.setenv("ETL_CLASS", "tests.transformers:Inspect")
    app = create_app()
    assert isinstance(app.extensions["etl_wsgi"]["/"], transformers.Inspect)
    assert put_hello(app, "/src/a.txt?etl_args=y") == (200, b"bytes:hello|src/a.txt|y")


@pytest.mark.parametrize(
    ("spec", "error", "text"),
    [
        (None, ConfigError, "ETL_CLASS"),
        ("tests.transformers:Nope", ConfigError, "tests.transformers:Nope"),
        ("tests.transformers:make_flask_app", TypeError, "make_flask_app"),
        (ETLServer, TypeError, "transform"),
    ],
    ids=["unset", "missing", "not-an-etl", "abstract"],
)
def test_create_app_rejects(env: pytest.MonkeyPatch, spec, error, text: str):
    with pytest.raises(error, match=text):
        create_app(spec)


def test_init_app_pattern_two_prefixes(env: pytest.MonkeyPatch):
    app = Flask("host")
    app.add_url_rule("/hello", "hello", lambda: "host hello")
    upper = ETLExtension()
    first = upper.init_app(app, etl=transformers.Upper, url_prefix="/a")
    inspect = ETLExtension()
    second = inspect.init_app(app, etl="tests.transformers:Inspect", url_prefix="/b")
    assert isinstance(first, transformers.Upper) and upper.etl is first
    assert isinstance(second, transformers.Inspect) and inspect.etl is second
    assert app.extensions["etl_wsgi"] == {"/a": first, "/b": second}
    client = app.test_client()
    assert client.get("/hello").data == b"host hello"
    assert client.get("/a/health").data == b"Running"
    assert put_hello(app, "/a/src/hello.txt") == (200, b"HELLO")
    assert put_hello(app, "/b/src/x.txt") == (200, b"bytes:hello|src/x.txt|")


def test_init_app_uses_the_app_config(env: pytest.MonkeyPatch):
    app = Flask("host")
    app.config["ETL_CLASS"] = "tests.transformers:Upper"
    ETLExtension(app, url_prefix="/etl")
    assert put_hello(app, "/etl/src/hello.txt") == (200, b"HELLO")
