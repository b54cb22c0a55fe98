"""etl_wsgi.worker_tuning: gunicorn's settings as plain attributes, peer verdicts remembered."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gunicorn.config import Config
from gunicorn.http import message

from etl_wsgi import worker_tuning
from etl_wsgi.worker_tuning import MAX_VERDICTS, freeze_config, ip_in_allow_list


@pytest.fixture
def restore_gunicorn() -> Iterator[None]:
    """install() patches gunicorn's module: put it back, with an empty cache."""
    original = message._ip_in_allow_list
    saved = worker_tuning._original_ip_in_allow_list
    yield
    message._ip_in_allow_list = original
    worker_tuning._original_ip_in_allow_list = saved
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
    gunicorns = message._ip_in_allow_list
    worker_tuning.install(Config())
    worker_tuning.install(Config())
    assert message._ip_in_allow_list is ip_in_allow_list
    assert worker_tuning._original_ip_in_allow_list is gunicorns
