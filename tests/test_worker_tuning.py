"""etl_wsgi.worker_tuning: settings as attributes, peer verdicts remembered, base environ shared."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from gunicorn.config import Config
from gunicorn.http import message, wsgi

from etl_wsgi import worker_tuning
from etl_wsgi.worker_tuning import MAX_VERDICTS, freeze_config, ip_in_allow_list


@pytest.fixture
def restore_gunicorn() -> Iterator[None]:
    """install() patches gunicorn's module: put it back, with an empty cache."""
    original, base = message._ip_in_allow_list, wsgi.base_environ
    saved = worker_tuning._original_ip_in_allow_list, worker_tuning._original_base_environ
    template = worker_tuning._worker_cfg, worker_tuning._template
    yield
    message._ip_in_allow_list, wsgi.base_environ = original, base
    worker_tuning._original_ip_in_allow_list, worker_tuning._original_base_environ = saved
    worker_tuning._worker_cfg, worker_tuning._template = template
    worker_tuning._verdicts.clear()


def test_frozen_config_answers_the_same_without_getattr(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config()
    cfg.set("keepalive", 30)
    cfg.set("forwarded_allow_ips", "10.0.0.1,127.0.0.1")
    before = {name: getattr(cfg, name) for name in cfg.settings}
    stored = freeze_config(cfg)
    assert 100 < stored < len(cfg.settings)  # properties of Config itself are left alone

    def no_lookup(self: Config, name: str) -> None:
        raise AssertionError(f"Config.__getattr__ asked for {name}")

    monkeypatch.setattr(Config, "__getattr__", no_lookup)
    assert cfg.keepalive == 30
    assert cfg.forwarded_allow_ips == ["10.0.0.1", "127.0.0.1"]
    assert cfg.forwarded_allow_ips is before["forwarded_allow_ips"]  # the same object
    assert cfg.limit_request_line == before["limit_request_line"]
    monkeypatch.undo()
    assert {name: getattr(cfg, name) for name in cfg.settings} == before
    assert not cfg.is_ssl  # a property: still Config's own


def test_freeze_leaves_an_unknown_config_alone() -> None:
    assert freeze_config(object()) == 0


@pytest.mark.parametrize(
    ("ip", "allow", "trusted"),
    [
        ("127.0.0.1", ["127.0.0.1", "::1"], True),
        ("10.1.2.3", ["127.0.0.1", "::1"], False),
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("::1", ["127.0.0.1", "::1"], True),
        ("not-an-ip", ["127.0.0.1"], False),
        ("192.0.2.9", ["*"], True),
    ],
)
def test_verdicts_are_gunicorns(restore_gunicorn: None, ip: str, allow: list, trusted: bool):
    cfg = Config()
    cfg.set("forwarded_allow_ips", ",".join(allow))
    worker_tuning.install(cfg)
    networks = cfg.forwarded_allow_networks()
    original = worker_tuning._original_ip_in_allow_list
    assert original(ip, cfg.forwarded_allow_ips, networks) is trusted
    for _ in range(2):  # the first answer computed, the second remembered
        assert message._ip_in_allow_list(ip, cfg.forwarded_allow_ips, networks) is trusted


def test_verdicts_are_kept_per_address_and_list(
    restore_gunicorn: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, object]] = []

    def counting(ip: str, allow: list, networks: list) -> bool:
        calls.append((ip, allow))
        return ip.startswith("10.")

    monkeypatch.setattr(worker_tuning, "_original_ip_in_allow_list", counting)
    forwarded, proxy, networks = ["10.0.0.0/8"], ["127.0.0.1"], []  # gunicorn keeps each
    for _ in range(3):
        assert ip_in_allow_list("10.0.0.1", forwarded, networks) is True
        assert ip_in_allow_list("10.0.0.1", proxy, networks) is True
        assert ip_in_allow_list("192.0.2.1", forwarded, networks) is False
    assert calls == [("10.0.0.1", forwarded), ("10.0.0.1", proxy), ("192.0.2.1", forwarded)]


def test_the_verdict_cache_is_bounded(restore_gunicorn: None, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(worker_tuning, "_original_ip_in_allow_list", lambda ip, a, n: False)
    allow: list[str] = []
    for i in range(MAX_VERDICTS + 10):
        ip_in_allow_list(f"10.0.{i // 256}.{i % 256}", allow, allow)
        assert len(worker_tuning._verdicts) <= MAX_VERDICTS
    assert len(worker_tuning._verdicts) == 10  # started over once full


def test_install_is_idempotent(restore_gunicorn: None) -> None:
    gunicorns, gunicorns_base = message._ip_in_allow_list, wsgi.base_environ
    worker_tuning.install(Config())
    second = Config()
    worker_tuning.install(second)
    assert message._ip_in_allow_list is ip_in_allow_list
    assert worker_tuning._original_ip_in_allow_list is gunicorns
    assert wsgi.base_environ is worker_tuning.base_environ
    assert worker_tuning._original_base_environ is gunicorns_base
    assert isinstance(wsgi.base_environ(second)["wsgi.errors"], worker_tuning.ErrorsStream)


def test_the_workers_base_environ_is_gunicorns_made_once(restore_gunicorn: None) -> None:
    gunicorns = wsgi.base_environ
    cfg = Config()
    cfg.set("workers", 3)
    worker_tuning.install(cfg)
    first, second = wsgi.base_environ(cfg), wsgi.base_environ(cfg)
    assert first is not second  # each request may change its own
    first["REQUEST_METHOD"] = "PUT"
    assert "REQUEST_METHOD" not in second
    errors = second["wsgi.errors"]
    assert isinstance(errors, wsgi.WSGIErrorsWrapper)
    assert first["wsgi.errors"] is errors  # one per worker, not one per request
    own = gunicorns(cfg)
    assert {k: v for k, v in second.items() if k != "wsgi.errors"} == {
        k: v for k, v in own.items() if k != "wsgi.errors"
    }
    assert second["wsgi.multiprocess"] is True
    other = Config()  # any other configuration: gunicorn's own, a new wrapper each time
    assert type(wsgi.base_environ(other)["wsgi.errors"]) is wsgi.WSGIErrorsWrapper
    assert wsgi.base_environ(other)["wsgi.multiprocess"] is False


def test_the_shared_errors_stream_writes_to_the_error_logs_current_streams(
    restore_gunicorn: None,
) -> None:
    cfg = Config()
    cfg.set("errorlog", "/var/log/etl.log")  # not "-": every handler's stream is written to
    worker_tuning.install(cfg)
    errors = wsgi.base_environ(cfg)["wsgi.errors"]
    handler = logging.StreamHandler(io.StringIO())
    error_log = logging.getLogger("gunicorn.error")
    error_log.addHandler(handler)
    try:
        errors.write("first\n")
        errors.close()  # by one request's app: the next request's errors still work
        errors.flush()
        before = handler.stream
        handler.setStream(io.StringIO())  # as a log file reopened on USR1
        errors.write("second\n")
    finally:
        error_log.removeHandler(handler)
    assert before.getvalue() == "first\n"
    assert handler.stream.getvalue() == "second\n"
