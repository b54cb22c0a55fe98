"""etl_wsgi.blueprint: Flask request -> handler -> response, and the error table (PROTOCOL.md §7).

In process through Flask's test client; the next hop / target is a real FakeTarget.  The
PROTOCOL.md §10 vector numbers are given where a test follows one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient

from etl_wsgi.app import create_app
from etl_wsgi.base_etl_server import ETLServer
from etl_wsgi.blueprint import blueprint_name
from etl_wsgi.errors import ETLError
from tests.fake_target import SECRET_PATH, CloseAfterBody, FakeTarget, Reply
from tests.transformers import Inspect, StreamFailFirst, Upper, UpperStream
from tests.unit_support import (
    SECRET,
    clear_settings_env,
    close_sessions,
    closed_port,
    dst,
    path_escape,
)


class ReturnsStr(ETLServer):
    def transform(self, data, path, etl_args):
        return data.decode()


class RaisesBadArgs(ETLServer):
    def transform(self, data, path, etl_args):
        raise ETLError(f"bad etl_args {etl_args!r}", status=400)


class LeaksTargetUrl(ETLServer):
    def transform(self, data, path, etl_args):
        raise ValueError(f"cannot reach {self.host_target}/x")


class BrokenMime(ETLServer):
    def transform(self, data, path, etl_args):
        return data

    def get_mime_type(self):
        raise RuntimeError("no mime")


class TextUpper(Upper):
    def get_mime_type(self):
        return "text/plain"


@pytest.fixture
def client_for(monkeypatch, target: FakeTarget) -> Iterator[Callable[..., FlaskClient]]:
    """``client_for(cls, **env)``: a test client of ``create_app(cls)``, AIS_TARGET_URL = target."""
    apps: list[Flask] = []

    def make(cls: type[ETLServer], **env: str) -> FlaskClient:
        clear_settings_env(monkeypatch, **{"AIS_TARGET_URL": target.url + SECRET_PATH, **env})
        app = create_app(cls)
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        close_sessions(app)


def error_of(resp) -> str:
    assert resp.content_type == "application/json"
    body = json.loads(resp.data)
    assert list(body) == ["error"]
    return body["error"]


# --- plain replies ---------------------------------------------------------------------------


def test_health(client_for) -> None:  # §10 #1
    resp = client_for(Upper).get("/health")
    assert (resp.status_code, resp.data) == (200, b"Running")
    assert resp.mimetype == "text/plain"


def test_buffered_put_body(client_for) -> None:  # §10 #2
    resp = client_for(Upper).put("/src/hello.txt", data=b"hello")
    assert (resp.status_code, resp.data) == (200, b"HELLO")
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["Content-Length"] == "5"


def test_custom_mime_type(client_for) -> None:
    resp = client_for(TextUpper).put("/a", data=b"x")
    assert resp.headers["Content-Type"].startswith("text/plain")


def test_streaming_put_body(client_for) -> None:
    with client_for(UpperStream).put("/src/hello.txt", data=b"hello" * 30_000) as resp:
        assert resp.status_code == 200
        assert resp.is_streamed
        assert "Content-Length" not in resp.headers
        assert resp.get_data() == b"HELLO" * 30_000


def test_fqn_args_and_path(client_for, obj) -> None:  # §10 #3
    resp = client_for(Inspect).put(
        "/src/hello.txt", query_string={"etl_fqn": path_escape(obj), "etl_args": "x"}
    )
    assert resp.data == b"bytes:hello|src/hello.txt|x"


def test_direct_fqn_hands_over_the_path(client_for, obj) -> None:  # §10 #4
    resp = client_for(Inspect, ETL_DIRECT_FQN="true").put(
        "/src/hello.txt", query_string={"etl_fqn": path_escape(obj)}
    )
    assert resp.status_code == 200
    assert resp.data == f"str:{obj}|src/hello.txt|".encode()


def test_fqn_as_aistore_encodes_it(client_for, tmp_path) -> None:
    """The wire form of §3: path-escaped, then query-encoded (``%`` -> ``%25``)."""
    path = tmp_path / "@ais" / "b" / "%ob" / "a b?.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"wire")
    wire = quote(quote(str(path), safe="@"), safe="@")
    resp = client_for(Upper).put(f"/b/a?etl_fqn={wire}")
    assert (resp.status_code, resp.data) == (200, b"WIRE")


def test_etl_args_are_stripped_and_slashes_kept(client_for) -> None:
    resp = client_for(Inspect).put("/src//a%20b.txt?etl_args=%20x%20", data=b"d")
    assert resp.data == b"bytes:d|src//a b.txt|x"


def test_hpull_path_is_decoded(client_for, obj) -> None:
    resp = client_for(Inspect).get(
        "/ais%2F@%23%2Fsrc%2Fhello.txt", query_string={"etl_fqn": path_escape(obj)}
    )
    assert resp.data == b"bytes:hello|ais/@#/src/hello.txt|"


def test_get_fetches_from_target(client_for, target: FakeTarget) -> None:  # §10 #6
    target.objects[SECRET_PATH + "/ais%2F@%23%2Fsrc%2Fhello.txt"] = b"hello"
    resp = client_for(Upper).get("/ais%2F@%23%2Fsrc%2Fhello.txt")
    assert (resp.status_code, resp.data) == (200, b"HELLO")
    (get,) = target.requests
    assert get.raw_path == SECRET_PATH + "/ais%2F@%23%2Fsrc%2Fhello.txt"


def test_object_named_ws_is_still_hpull(client_for, target: FakeTarget) -> None:
    target.objects[SECRET_PATH + "/ws"] = b"plain"
    resp = client_for(Upper).get("/ws")
    assert (resp.status_code, resp.data) == (200, b"PLAIN")


def test_blank_pipeline_header(client_for) -> None:  # §10 #13
    resp = client_for(Upper).put("/src/a.txt", data=b"hello", headers={"Ais-Node-Url": "   "})
    assert (resp.status_code, resp.data) == (200, b"HELLO")


# --- direct put --------------------------------------------------------------------------------


def test_direct_put_to_destination(client_for, target: FakeTarget) -> None:  # §10 #8
    resp = client_for(Upper).put(
        "/src/a.txt?etl_args=q", data=b"hello", headers={"Ais-Node-Url": dst(target)}
    )
    assert (resp.status_code, resp.data) == (204, b"")
    assert resp.headers["Ais-Direct-Put-Length"] == "5"
    (put,) = target.puts
    assert put.path == SECRET_PATH + "/ais%2F@%23%2Fdst%2Fa.txt"
    assert put.query == [("owt", "3"), ("uuid", "XID1"), ("etl_args", "q")]
    assert put.body == b"HELLO"
    assert put.header("Ais-Node-Url") is None


def test_direct_put_to_stage(client_for, target: FakeTarget) -> None:  # §10 #9
    target.script = [Reply(204, headers={"Ais-Direct-Put-Length": "7"})]
    resp = client_for(Upper).put(
        "/src/a.txt", data=b"hello", headers={"Ais-Node-Url": f"{target.url},{dst(target)}"}
    )
    assert resp.status_code == 204
    assert resp.headers["Ais-Direct-Put-Length"] == "7"
    (put,) = target.puts
    assert put.raw_path == "/src/a.txt"
    assert put.header("Ais-Node-Url") == dst(target)
    assert put.body == b"HELLO"


def test_last_stage_body_comes_back(client_for, target: FakeTarget) -> None:  # §10 #10
    target.script = [Reply(200, b"HELLO!")]
    resp = client_for(Upper).put("/src/a.txt", data=b"hello", headers={"Ais-Node-Url": target.url})
    assert (resp.status_code, resp.data) == (200, b"HELLO!")
    assert "Ais-Direct-Put-Length" not in resp.headers


def test_next_hop_error_passes_through(client_for, target: FakeTarget) -> None:  # §10 #11
    target.script = [Reply(507, b"no space")]
    resp = client_for(Upper).put("/src/a.txt", data=b"hello", headers={"Ais-Node-Url": dst(target)})
    assert (resp.status_code, resp.data) == (507, b"no space")


def test_streaming_one_shot_body_bails_503(client_for, target: FakeTarget) -> None:  # §10 #16
    target.default = CloseAfterBody()
    resp = client_for(UpperStream).put(
        "/src/a.txt", data=b"hello", headers={"Ais-Node-Url": dst(target)}
    )
    assert resp.status_code == 503
    assert resp.headers["Ais-Etl-Retry-Reason"] == "direct-put-transient"
    assert error_of(resp).startswith("Direct put bailed (one-shot body): direct_put to ")
    assert len(target.puts) == 1


def test_direct_put_exhausted_is_502_and_redacted(client_for, target: FakeTarget) -> None:
    target.default = CloseAfterBody()
    resp = client_for(Upper, AIS_DIRECT_PUT_RETRIES="0").put(
        "/src/a.txt", data=b"hello", headers={"Ais-Node-Url": dst(target)}
    )
    assert resp.status_code == 502
    assert "Ais-Etl-Retry-Reason" not in resp.headers
    message = error_of(resp)
    assert message.startswith(f"Direct put failed after retries: direct_put to '{dst(target)}'")
    # the cause's text names the full outbound URL; its secret must not leave the pod
    assert SECRET not in message
    assert "/v1/etl/_object/etl-upper/***/" in message


def test_direct_put_refused_is_502(client_for) -> None:
    hop = f"http://127.0.0.1:{closed_port()}"
    resp = client_for(Upper).put("/src/a.txt", data=b"hello", headers={"Ais-Node-Url": hop})
    assert resp.status_code == 502
    assert error_of(resp).startswith(f"direct_put to '{hop}' failed: ConnectionError: ")


# --- errors ----------------------------------------------------------------------------------


def test_missing_fqn_is_404_naming_both(client_for, tmp_path) -> None:  # §10 #5
    gone = tmp_path / "mp1" / "gone"
    resp = client_for(Upper).put("/src/gone.txt", query_string={"etl_fqn": path_escape(gone)})
    assert resp.status_code == 404
    assert error_of(resp) == (
        f"Error processing object 'src/gone.txt': file not found at '{gone}'."
    )


def test_upstream_404(client_for) -> None:  # §10 #7
    resp = client_for(Upper).get("/ais%2F@%23%2Fsrc%2Fnone")
    assert resp.status_code == 404
    assert error_of(resp) == "Target request failed"


def test_upstream_unreachable_is_502_and_redacted(client_for) -> None:  # §10 #7
    client = client_for(Upper, AIS_TARGET_URL=f"http://127.0.0.1:{closed_port()}{SECRET_PATH}")
    resp = client.get("/ais%2F@%23%2Fsrc%2Fhello.txt")
    assert resp.status_code == 502
    message = error_of(resp)
    assert message.startswith("Network error: ConnectionError: ")
    assert SECRET not in message


def test_invalid_pipeline_is_400(client_for) -> None:  # §10 #12
    resp = client_for(Upper).put(
        "/src/a.txt", data=b"hello", headers={"Ais-Node-Url": "http://a:1,,http://b:2"}
    )
    assert resp.status_code == 400
    assert error_of(resp) == "Invalid pipeline header: Pipeline header contains empty entry"


def test_transform_error_is_500(client_for) -> None:  # §10 #14
    resp = client_for(Upper).put("/src/a.txt", data=b"boom")
    assert resp.status_code == 500
    assert json.loads(resp.data) == {"error": "bad"}


def test_transform_returning_str_is_500_with_a_clear_message(client_for) -> None:
    resp = client_for(ReturnsStr).put("/src/a.txt", data=b"x")
    assert resp.status_code == 500
    assert error_of(resp) == "transform() returned str, expected bytes"


def test_user_etl_error_keeps_its_status(client_for) -> None:
    resp = client_for(RaisesBadArgs).put("/src/a.txt?etl_args=zz", data=b"x")
    assert resp.status_code == 400
    assert error_of(resp) == "bad etl_args 'zz'"


def test_secret_is_redacted_from_error_bodies(client_for) -> None:
    resp = client_for(LeaksTargetUrl).put("/src/a.txt", data=b"x")
    assert resp.status_code == 500
    message = error_of(resp)
    assert SECRET not in message
    assert message.endswith("/v1/etl/_object/etl-upper/***/x")


def test_streaming_failure_before_first_chunk_is_500(client_for, obj) -> None:
    resp = client_for(StreamFailFirst).put("/src/a.txt", query_string={"etl_fqn": path_escape(obj)})
    assert resp.status_code == 500
    assert error_of(resp) == "bad stream"


def test_unexpected_error_is_500_json(client_for) -> None:
    resp = client_for(BrokenMime).put("/src/a.txt", data=b"x")
    assert resp.status_code == 500
    assert error_of(resp) == "RuntimeError: no mime"


def test_routing_errors_stay_werkzeug_answers(client_for) -> None:
    client = client_for(Upper)
    assert client.post("/src/a.txt", data=b"x").status_code == 405
    assert client.delete("/src/a.txt").status_code == 405


def test_root_path(client_for) -> None:
    resp = client_for(Inspect).put("/", data=b"r")
    assert resp.data == b"bytes:r||"


# --- helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "name"),
    [
        (None, "etl_wsgi"),
        ("/", "etl_wsgi"),
        ("/etl", "etl_wsgi_etl"),
        ("/a/b-c/", "etl_wsgi_a_b_c"),
    ],
)
def test_blueprint_name(prefix: str | None, name: str) -> None:
    assert blueprint_name(prefix) == name
