"""TLS out (to the target and next hops) and in (serving HTTPS/WSS), against real TLS servers.

Outbound (PROTOCOL.md §1.2, §2.6, §4.2): every request of the worker's one session (hpull GET,
direct put) trusts ``AIS_CLIENT_CA``, presents ``AIS_CRT``/``AIS_CRT_KEY`` for mTLS, honours
``AIS_SKIP_VERIFY_CRT`` and sends ``Authorization: Bearer <AIS_AUTHN_TOKEN>``.  A TLS failure is
configuration, not a transient error: ``502`` at once, no retry (§4.4), and the message says
which settings to check.  The token never shows in an error body or a log line.

Inbound: ``ETL_CERTFILE``/``ETL_KEYFILE`` make gunicorn's gevent workers serve HTTPS and WSS.
Certificates come from trustme (tests/tls_support.py); all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator

import pytest
import requests
import websocket

from etl_wsgi.config import ConfigError, Settings
from etl_wsgi.direct_put import tls_error
from etl_wsgi.gunicorn_hooks import config_values
from etl_wsgi.protocol import redact_secret
from tests.conftest import GunicornServer
from tests.e2e_support import TIMEOUT, booted, request
from tests.fake_target import SECRET_PATH
from tests.test_e2e_ws import OP_BINARY, expect_close, recv, send_task
from tests.tls_support import Pki, TLSFakeTarget, TLSGunicornServer
from tests.unit_support import SECRET, TARGET_URL, clear_settings_env, dst

TOKEN = "tok-3f9c2a7e-never-logged"
OBJECT = SECRET_PATH + "/src%2Fa.txt"  # what the hpull GET of /src/a.txt asks for (§2.6)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_target(pki: Pki) -> Iterator[TLSFakeTarget]:
    with TLSFakeTarget(pki) as fake:
        yield fake


@pytest.fixture(scope="module")
def mtls_target(pki: Pki) -> Iterator[TLSFakeTarget]:
    """Requires a client certificate signed by the test CA."""
    with TLSFakeTarget(pki, require_client_cert=True) as fake:
        yield fake


@pytest.fixture
def targets(tls_target: TLSFakeTarget, mtls_target: TLSFakeTarget) -> TLSFakeTarget:
    """Both targets reset, with the hpull object; returns the plain-TLS one."""
    for fake in (tls_target, mtls_target):
        fake.reset()
        fake.objects[OBJECT] = b"hello"
    return tls_target


def error_of(body: bytes) -> str:
    return str(json.loads(body)["error"])


# ---- settings ----------------------------------------------------------------------------------


def test_certfile_and_keyfile_go_together(pki: Pki) -> None:
    base = {"AIS_TARGET_URL": TARGET_URL}
    for one in ({"ETL_CERTFILE": str(pki.server_crt)}, {"ETL_KEYFILE": str(pki.server_key)}):
        with pytest.raises(ConfigError, match="ETL_CERTFILE and ETL_KEYFILE"):
            Settings.from_env({**base, **one})
    with pytest.raises(ConfigError, match="ETL_KEYFILE='/nope': file does not exist"):
        Settings.from_env({**base, "ETL_CERTFILE": str(pki.server_crt), "ETL_KEYFILE": "/nope"})


def test_certfile_maps_to_gunicorn(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings_env(monkeypatch)
    assert "certfile" not in config_values()
    clear_settings_env(
        monkeypatch, ETL_CERTFILE=str(pki.server_crt), ETL_KEYFILE=str(pki.server_key)
    )
    values = config_values()
    assert (values["certfile"], values["keyfile"]) == (str(pki.server_crt), str(pki.server_key))


def test_token_is_redacted_like_the_secret() -> None:
    text = f"Authorization: Bearer {TOKEN} for {TARGET_URL}"
    out = redact_secret(text, TARGET_URL, TOKEN)
    assert TOKEN not in out and SECRET not in out
    assert out.startswith("Authorization: Bearer *** for http://10.0.0.1:9080/")


def test_only_tls_errors_become_tls_errors() -> None:
    assert tls_error(requests.ConnectionError("reset"), "h:1") is None
    err = tls_error(requests.exceptions.SSLError(ssl.SSLCertVerificationError(1, "bad")), "h:1")
    assert err is not None and err.status == 502
    assert "TLS with 'h:1' failed: SSLCertVerificationError" in err.message
    assert "AIS_CLIENT_CA" in err.message


# ---- outbound: trusting the CA, with a token ---------------------------------------------------


@pytest.fixture(scope="module")
def trusting(tls_target: TLSFakeTarget, pki: Pki) -> Iterator[GunicornServer]:
    env = {"AIS_CLIENT_CA": str(pki.ca_pem), "AIS_AUTHN_TOKEN": TOKEN}
    with booted("transformers:Upper", tls_target, **env) as server:
        yield server


def test_hpull_get_over_https_with_ca_and_token(
    trusting: GunicornServer, targets: TLSFakeTarget
) -> None:
    status, _headers, body = request(trusting, "GET", "/src/a.txt")
    assert (status, body) == (200, b"HELLO")
    (get,) = targets.requests
    assert (get.method, get.path) == ("GET", OBJECT)
    assert get.header("Authorization") == f"Bearer {TOKEN}"
    assert "MonkeyPatchWarning" not in trusting.log()


def test_direct_put_over_https_with_ca_and_token(
    trusting: GunicornServer, targets: TLSFakeTarget
) -> None:
    status, headers, body = request(
        trusting, "PUT", "/src/a.txt", b"hello", {"Ais-Node-Url": dst(targets)}
    )
    assert (status, body, headers["Ais-Direct-Put-Length"]) == (204, b"", "5")
    (put,) = targets.puts
    assert put.body == b"HELLO"
    assert put.header("Authorization") == f"Bearer {TOKEN}"


def test_missing_client_certificate_is_502_at_once(
    trusting: GunicornServer, targets: TLSFakeTarget, mtls_target: TLSFakeTarget
) -> None:
    status, _headers, body = request(
        trusting, "PUT", "/src/a.txt", b"hello", {"Ais-Node-Url": dst(mtls_target)}
    )
    assert status == 502, body
    message = error_of(body)
    assert f"TLS with '{dst(mtls_target)}' failed" in message
    assert "AIS_CRT/AIS_CRT_KEY" in message
    assert TOKEN not in message
    assert mtls_target.requests == []  # no request got through the handshake
    assert "retrying" not in trusting.log()  # not a transient error: no local retry


# ---- outbound: not trusting the CA -------------------------------------------------------------


@pytest.fixture(scope="module")
def untrusting(tls_target: TLSFakeTarget) -> Iterator[GunicornServer]:
    with booted("transformers:Upper", tls_target, AIS_AUTHN_TOKEN=TOKEN) as server:
        yield server


def test_hpull_get_without_ca_is_502_naming_the_setting(
    untrusting: GunicornServer, targets: TLSFakeTarget
) -> None:
    status, _headers, body = request(untrusting, "GET", "/src/a.txt")
    assert status == 502, body
    message = error_of(body)
    assert f"TLS with '127.0.0.1:{targets.port}' failed: SSLCertVerificationError" in message
    assert "certificate verify failed" in message and "AIS_CLIENT_CA" in message
    assert TOKEN not in message and SECRET not in message
    assert targets.requests == []


def test_direct_put_without_ca_is_502_without_retries(
    untrusting: GunicornServer, targets: TLSFakeTarget
) -> None:
    status, _headers, body = request(
        untrusting, "PUT", "/src/a.txt", b"hello", {"Ais-Node-Url": dst(targets)}
    )
    assert status == 502, body
    assert "certificate verify failed" in error_of(body)
    assert targets.requests == []
    log = untrusting.log()
    assert "retrying" not in log
    assert "-> 502: TLS with" in log  # the error is logged ...
    assert TOKEN not in log  # ... and the token never is


# ---- outbound: skip verify, mTLS ---------------------------------------------------------------


def test_skip_verify_trusts_any_certificate(serve, targets: TLSFakeTarget) -> None:
    server = serve(
        "transformers:Upper",
        AIS_TARGET_URL=targets.url + SECRET_PATH,
        AIS_SKIP_VERIFY_CRT="true",
    )
    status, _headers, body = request(server, "GET", "/src/a.txt")
    assert (status, body) == (200, b"HELLO")
    status, _headers, body = request(
        server, "PUT", "/src/a.txt", b"hello", {"Ais-Node-Url": dst(targets)}
    )
    assert status == 204, body
    assert [r.method for r in targets.requests] == ["GET", "PUT"]


def test_mtls_presents_the_client_certificate(
    serve, pki: Pki, targets: TLSFakeTarget, mtls_target: TLSFakeTarget
) -> None:
    server = serve(
        "transformers:UpperStream",  # streaming: chunked body over TLS
        AIS_TARGET_URL=mtls_target.url + SECRET_PATH,
        AIS_CLIENT_CA=str(pki.ca_pem),
        AIS_CRT=str(pki.client_crt),
        AIS_CRT_KEY=str(pki.client_key),
    )
    status, _headers, body = request(server, "GET", "/src/a.txt")
    assert (status, body) == (200, b"HELLO")
    status, _headers, body = request(
        server, "GET", "/src/a.txt", None, {"Ais-Node-Url": dst(mtls_target)}
    )
    assert status == 204, body
    assert [(r.method, r.body) for r in mtls_target.requests] == [
        ("GET", b""),
        ("GET", b""),
        ("PUT", b"HELLO"),
    ]


# ---- inbound: serving HTTPS and WSS ------------------------------------------------------------


@pytest.fixture(scope="module")
def https_server(module_target, pki: Pki) -> Iterator[TLSGunicornServer]:
    server = TLSGunicornServer(
        'etl_wsgi.app:create_app("transformers:Upper")',
        pki,
        {"AIS_TARGET_URL": module_target.url + SECRET_PATH},
    )
    try:
        yield server.start()  # healthy over HTTPS, verified with the test CA
    finally:
        server.stop()


def test_https_put_verified_with_the_ca(https_server: TLSGunicornServer, pki: Pki) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", https_server.port, timeout=TIMEOUT, context=pki.client_context()
    )
    try:
        for _ in range(2):  # two requests on one kept-alive TLS connection
            conn.request("PUT", "/src/a.txt", body=b"hello")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"HELLO")
    finally:
        conn.close()
    # gunicorn imports ssl in the master; gevent still patches it cleanly in the worker
    log = https_server.log()
    assert "MonkeyPatchWarning" not in log
    assert "serving HTTPS" in log and f"Listening at: https://127.0.0.1:{https_server.port}" in log


def test_https_server_is_not_trusted_without_the_ca(https_server: TLSGunicornServer) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(https_server.url + "/health", timeout=TIMEOUT)


def test_wss_round_trip(https_server: TLSGunicornServer, pki: Pki) -> None:
    ws = websocket.create_connection(
        f"wss://127.0.0.1:{https_server.port}/ws",
        timeout=TIMEOUT,
        sslopt={"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": str(pki.ca_pem)},
    )
    try:
        for text in (b"hello", b"x" * 300_000):  # one frame, then one spanning many TLS records
            send_task(ws, {"path": "a"}, text)
            assert recv(ws) == (OP_BINARY, text.upper())
        send_task(ws, {"path": "a", "pipeline": "http://127.0.0.1:1,"}, b"x")  # bad: empty entry
        code, reason = expect_close(ws)  # a failure closes, over TLS too
        assert (code, reason) == (
            1011,
            "bad task: Invalid pipeline header: Pipeline header contains empty entry",
        )
    finally:
        ws.close(timeout=2)
        ws.shutdown()


def test_certfile_without_keyfile_stops_gunicorn(module_target, pki: Pki) -> None:
    env = {"AIS_TARGET_URL": module_target.url + SECRET_PATH, "ETL_CERTFILE": str(pki.server_crt)}
    server = GunicornServer('etl_wsgi.app:create_app("transformers:Upper")', env)
    try:
        with pytest.raises(RuntimeError, match="ETL_CERTFILE and ETL_KEYFILE must be set together"):
            server.start()
    finally:
        server.stop()
