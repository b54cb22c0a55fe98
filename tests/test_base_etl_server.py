"""etl_wsgi.base_etl_server: the PROTOCOL.md §8.1 surface, against real sockets where it matters."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError

from etl_wsgi.base_etl_server import (
    DRAIN_CHUNK_BYTES,
    RETRY_BACKOFF_BASE,
    RETRY_BACKOFF_MAX,
    SYNC_DIRECT_PUT_TRANSIENT_ERRORS,
    CountingIterator,
    ETLDirectPutTransientError,
    ETLServer,
    InvalidPipelineError,
    _compute_replayable_retries,
    _handle_direct_put_transient_error,
    _is_connection_refused,
)
from etl_wsgi.config import ConfigError
from tests.fake_target import SECRET_PATH, FakeTarget, Reply
from tests.unit_support import TARGET_URL, clear_settings_env, closed_port

log = logging.getLogger(__name__)


class Buffered(ETLServer):
    def transform(self, data, path, etl_args):
        return data


class Streaming(ETLServer):
    def transform_stream(self, reader, path, etl_args):
        yield reader.read()


class Both(ETLServer):
    def transform(self, data, path, etl_args):
        return data

    def transform_stream(self, reader, path, etl_args):
        yield reader.read()


class Neither(ETLServer):
    pass


# --- public surface --------------------------------------------------------------------------


def test_package_exports() -> None:
    from etl_wsgi import CountingIterator as PublicCountingIterator
    from etl_wsgi import ETLServer as PublicETLServer

    assert PublicETLServer is ETLServer
    assert PublicCountingIterator is CountingIterator


def test_package_unknown_attribute() -> None:
    import etl_wsgi

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        etl_wsgi.nope  # noqa: B018


def test_constants() -> None:
    assert RETRY_BACKOFF_BASE == 2.0
    assert RETRY_BACKOFF_MAX == 30.0
    assert DRAIN_CHUNK_BYTES == 65536
    assert (
        requests.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
    ) == SYNC_DIRECT_PUT_TRANSIENT_ERRORS
    assert issubclass(InvalidPipelineError, ValueError)
    assert issubclass(ETLDirectPutTransientError, Exception)


@pytest.mark.parametrize(
    ("fqn", "is_get", "expected"),
    [
        ("/mp1/x", False, (True, 3)),
        ("", True, (True, 3)),
        ("/mp1/x", True, (True, 3)),
        ("", False, (False, 0)),
    ],
)
def test_compute_replayable_retries(fqn: str, is_get: bool, expected: tuple[bool, int]) -> None:
    assert _compute_replayable_retries(fqn, is_get, 3) == expected


# --- construction ----------------------------------------------------------------------------


def test_base_class_itself_cannot_be_constructed(make) -> None:
    with pytest.raises(TypeError, match="must override either transform"):
        make(ETLServer)


def test_neither_override_is_a_type_error_at_construction(make) -> None:
    with pytest.raises(TypeError, match="Neither must override either transform"):
        make(Neither)


def test_neither_override_fails_before_reading_settings(monkeypatch) -> None:
    clear_settings_env(monkeypatch)  # no AIS_TARGET_URL: the TypeError still comes first
    with pytest.raises(TypeError):
        Neither()


@pytest.mark.parametrize(
    ("cls", "streaming"), [(Buffered, False), (Streaming, True), (Both, False)]
)
def test_use_streaming(make, cls: type[ETLServer], streaming: bool) -> None:
    assert make(cls).use_streaming is streaming


def test_base_methods_raise_not_implemented(make) -> None:
    etl = make(Buffered)
    with pytest.raises(NotImplementedError):
        next(iter(ETLServer.transform_stream(etl, None, "p", "")))  # type: ignore[arg-type]
    streaming = make(Streaming)
    with pytest.raises(NotImplementedError):
        ETLServer.transform(streaming, b"", "p", "")


def test_attributes_from_environment(make) -> None:
    etl = make(
        Buffered,
        AIS_TARGET_URL=TARGET_URL + "/",
        ETL_DIRECT_FQN="true",
        AIS_DIRECT_PUT_RETRIES="5",
        AIS_AUTHN_TOKEN="tok123",
        direct_put="true",
    )
    assert etl.host_target == TARGET_URL
    assert etl.direct_fqn is True
    assert etl.direct_put is True
    assert etl.direct_put_retries == 5
    assert etl.token == "tok123"
    assert etl.session.headers["Authorization"] == "Bearer tok123"
    assert etl.logger.name == "Buffered"
    assert etl.get_mime_type() == "application/octet-stream"
    assert etl.settings.direct_put_retries == 5


def test_attribute_defaults(make) -> None:
    etl = make(Buffered)
    assert (etl.direct_fqn, etl.direct_put, etl.direct_put_retries, etl.token) == (
        False,
        False,
        3,
        None,
    )
    assert "Authorization" not in etl.session.headers


def test_missing_target_url_is_an_environment_error(monkeypatch) -> None:
    clear_settings_env(monkeypatch)
    with pytest.raises(EnvironmentError, match="AIS_TARGET_URL") as info:
        Buffered()
    assert isinstance(info.value, ConfigError)


def test_bad_setting_fails_construction(monkeypatch) -> None:
    clear_settings_env(monkeypatch, AIS_TARGET_URL=TARGET_URL, AIS_DIRECT_PUT_RETRIES="-1")
    with pytest.raises(ConfigError, match="AIS_DIRECT_PUT_RETRIES"):
        Buffered()


def test_session_has_no_hidden_retries_and_ignores_proxy_env(make) -> None:
    session = make(Buffered, ETL_POOL_MAXSIZE="7").session
    assert session.trust_env is False
    for prefix in ("http://x", "https://x"):
        adapter = session.get_adapter(prefix)
        assert adapter.max_retries.total == 0
        assert adapter.max_retries.redirect == 0
        assert adapter._pool_maxsize == 7


def test_session_tls_settings(make, tmp_path) -> None:
    ca, crt, key = (tmp_path / n for n in ("ca.pem", "c.crt", "c.key"))
    for p in (ca, crt, key):
        p.write_text("x")
    session = make(Buffered, AIS_CLIENT_CA=str(ca), AIS_CRT=str(crt), AIS_CRT_KEY=str(key)).session
    assert session.verify == str(ca)
    assert session.cert == (str(crt), str(key))
    assert make(Buffered, AIS_SKIP_VERIFY="1", AIS_CLIENT_CA=str(ca)).session.verify is False
    assert make(Buffered).session.verify is True


def test_session_cert_needs_both(make, tmp_path) -> None:
    crt = tmp_path / "c.crt"
    crt.write_text("x")
    assert make(Buffered, AIS_CRT=str(crt)).session.cert is None


# --- static helpers --------------------------------------------------------------------------


def test_make_direct_put_headers() -> None:
    assert ETLServer.make_direct_put_headers(0) == {}
    assert ETLServer.make_direct_put_headers(5) == {"Ais-Direct-Put-Length": "5"}


def test_sanitize_fqn(make) -> None:
    etl = make(Buffered)
    assert etl.sanitize_fqn("%2Fmp1%2F@ais%2Fsrc%2F%25ob%2Fhello.txt") == (
        "/mp1/@ais/src/%ob/hello.txt"
    )
    assert etl.sanitize_fqn("%2F..%2F..%2Fetc%2Fpasswd") == "/etc/passwd"


class Closable:
    def __init__(self, fail: bool = False) -> None:
        self.closed = 0
        self.fail = fail

    def close(self) -> None:
        self.closed += 1
        if self.fail:
            raise OSError("close failed")


def test_close_reader_closes_and_swallows_errors(caplog) -> None:
    ok, bad = Closable(), Closable(fail=True)
    ETLServer.close_reader(ok)
    with caplog.at_level(logging.WARNING):
        ETLServer.close_reader(bad)
    assert (ok.closed, bad.closed) == (1, 1)
    assert "closing reader failed" in caplog.text
    ETLServer.close_reader(object())  # nothing to close
    ETLServer.close_reader(None)


def test_iter_and_close_on_normal_end(tmp_path) -> None:
    path = tmp_path / "obj"
    path.write_bytes(b"abcdef")
    reader = open(path, "rb")
    out = list(ETLServer.iter_and_close(iter([reader.read(3), reader.read(3)]), reader))
    assert out == [b"abc", b"def"]
    assert reader.closed


def test_iter_and_close_on_exception(tmp_path) -> None:
    path = tmp_path / "obj"
    path.write_bytes(b"abc")
    reader = open(path, "rb")

    def fails() -> Iterator[bytes]:
        yield reader.read(1)
        raise ValueError("mid-stream")

    gen = ETLServer.iter_and_close(fails(), reader)
    assert next(gen) == b"a"
    with pytest.raises(ValueError, match="mid-stream"):
        next(gen)
    assert reader.closed


def test_iter_and_close_when_closed_early(tmp_path) -> None:
    path = tmp_path / "obj"
    path.write_bytes(b"abc")
    reader = open(path, "rb")
    gen = ETLServer.iter_and_close(iter([b"1", b"2", b"3"]), reader)
    assert next(gen) == b"1"
    gen.close()
    assert reader.closed


def test_iter_and_close_swallows_a_failing_close() -> None:
    bad = Closable(fail=True)
    assert list(ETLServer.iter_and_close(iter([b"x"]), bad)) == [b"x"]
    assert bad.closed == 1


def test_counting_iterator_counts() -> None:
    it = CountingIterator([b"ab", b"", b"cde", bytearray(b"f")])
    assert it.bytes_sent == 0
    assert list(it) == [b"ab", b"", b"cde", bytearray(b"f")]
    assert it.bytes_sent == 6


def test_counting_iterator_counts_what_was_consumed() -> None:
    it = CountingIterator(iter([b"abc", b"de"]))
    gen = iter(it)
    next(gen)
    assert it.bytes_sent == 3


# --- connection refused classification (PROTOCOL.md §4.4, §9.2 #1) -------------------------------


def _refused_via_context_only() -> requests.ConnectionError:
    """The urllib3 1.x chain: the refusal is only the ``__context__`` of NewConnectionError."""
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:
            raise NewConnectionError(None, "Failed to establish a new connection") from None  # type: ignore[arg-type]
    except NewConnectionError as exc:
        reason = exc
    # ``from None`` sets __suppress_context__ but keeps __context__: only the context links it
    assert reason.__cause__ is None
    assert isinstance(reason.__context__, ConnectionRefusedError)
    return requests.ConnectionError(MaxRetryError(None, "/x", reason))  # type: ignore[arg-type]


def _real_refused(session: requests.Session) -> requests.ConnectionError:
    with pytest.raises(requests.ConnectionError) as info:
        session.put(f"http://127.0.0.1:{closed_port()}/x", data=b"x", timeout=5)
    return info.value


def test_real_refused_connection_is_detected(make) -> None:
    assert _is_connection_refused(_real_refused(make(Buffered).session))


def test_refused_on_context_only_is_detected() -> None:
    assert _is_connection_refused(_refused_via_context_only())


def _new_conn_error_caused_by(cause: BaseException) -> requests.ConnectionError:
    reason = NewConnectionError(None, "Failed")  # type: ignore[arg-type]
    reason.__cause__ = cause
    return requests.ConnectionError(MaxRetryError(None, "/x", reason))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "exc",
    [
        requests.ConnectionError("lost"),
        requests.ConnectionError(),
        requests.ConnectionError(MaxRetryError(None, "/x", None)),  # type: ignore[arg-type]
        requests.ConnectionError(MaxRetryError(None, "/x", OSError("x"))),  # type: ignore[arg-type]
        _new_conn_error_caused_by(TimeoutError("slow")),
        _new_conn_error_caused_by(ConnectionResetError("reset")),
        requests.exceptions.ChunkedEncodingError("broken"),
    ],
)
def test_other_errors_are_not_refused(exc: Exception) -> None:
    assert not _is_connection_refused(exc)


def test_handle_transient_error_refused_returns_502(make) -> None:
    exc = _real_refused(make(Buffered).session)
    status, body, length = _handle_direct_put_transient_error("http://h:1/o", exc, log)
    assert (status, length) == (502, 0)
    assert body.startswith(b"direct_put to 'http://h:1/o' failed: ConnectionError: ")


def test_handle_transient_error_refused_via_context_returns_502() -> None:
    status, _, _ = _handle_direct_put_transient_error("u", _refused_via_context_only(), log)
    assert status == 502


@pytest.mark.parametrize(
    "exc",
    [requests.ConnectionError("lost"), requests.exceptions.ChunkedEncodingError("broken")],
)
def test_handle_transient_error_otherwise_raises(exc: Exception) -> None:
    with pytest.raises(ETLDirectPutTransientError) as info:
        _handle_direct_put_transient_error("http://h:1/o", exc, log)
    err = info.value
    assert (err.url, err.cause, err.bail_without_local_retry) == ("http://h:1/o", exc, False)
    assert err.status == 502
    assert str(err).startswith("direct_put to 'http://h:1/o' failed with transient error: ")


# --- client_put and handle_direct_put_response against a real HTTP server (§4.3) -----------------


@pytest.mark.parametrize(
    ("reply", "data_length", "expected"),
    [
        (Reply(204, headers={"Ais-Direct-Put-Length": "7"}), -1, (204, b"", 7)),
        (Reply(204), -1, (204, b"", 0)),
        (Reply(200, b"HELLO!"), -1, (200, b"HELLO!", 0)),
        (Reply(200), -1, (204, b"", 5)),
        (Reply(200), 42, (204, b"", 42)),
        (Reply(507, b"no space"), -1, (507, b"no space", 0)),
        (Reply(404, b"object not found"), -1, (404, b"object not found", 0)),
        (Reply(500, b""), -1, (500, b"", 0)),
    ],
)
def test_handle_direct_put_response(
    make, target: FakeTarget, reply: Reply, data_length: int, expected: tuple
) -> None:
    etl = make(Buffered, AIS_TARGET_URL=target.url + SECRET_PATH)
    target.script = [reply]
    with etl.client_put(target.url + "/o", b"hello", {}) as resp:
        assert etl.handle_direct_put_response(resp, b"hello", data_length) == expected
    (put,) = target.puts
    assert put.body == b"hello"


def test_handle_direct_put_response_logs_errors(make, target: FakeTarget, caplog) -> None:
    etl = make(Buffered)
    target.script = [Reply(507, b"no space")]
    with (
        caplog.at_level(logging.ERROR, logger="Buffered"),
        etl.client_put(target.url + "/o", b"x", {}) as resp,
    ):
        etl.handle_direct_put_response(resp, b"x")
    assert "HTTP 507" in caplog.text
    assert "no space" in caplog.text


def test_client_put_sends_token_and_headers(make, target: FakeTarget) -> None:
    etl = make(Buffered, AIS_AUTHN_TOKEN="tok")
    with etl.client_put(target.url + "/o?x=1", b"abc", {"Ais-Node-Url": "http://n:1"}) as r:
        assert r.status_code == 200
    (put,) = target.puts
    assert put.header("Authorization") == "Bearer tok"
    assert put.header("Ais-Node-Url") == "http://n:1"
    assert put.raw_path == "/o?x=1"
    assert put.body == b"abc"


def test_client_put_does_not_follow_redirects(make, target: FakeTarget) -> None:
    etl = make(Buffered)
    target.script = [Reply(307, headers={"Location": target.url + "/elsewhere"})]
    with etl.client_put(target.url + "/o", b"abc", {}) as resp:
        assert resp.status_code == 307
    assert len(target.requests) == 1
