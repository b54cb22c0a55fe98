"""etl_wsgi.config: every setting declared once, parsed and validated once (PROTOCOL.md §1.2)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from etl_wsgi.config import (
    TRUTHY,
    ConfigError,
    Settings,
    parse_bool,
    settings_table,
)
from tests.unit_support import TARGET_URL, clear_settings_env

BASE = {"AIS_TARGET_URL": TARGET_URL}
FIELDS = {f.metadata["env"]: f for f in dataclasses.fields(Settings)}
FIELDS_BY_ANY_NAME = {
    name: f for f in FIELDS.values() for name in (f.metadata["env"], *f.metadata["aliases"])
}


def env_names() -> list[str]:
    return list(FIELDS_BY_ANY_NAME)


def parse(**env: str) -> Settings:
    return Settings.from_env({**BASE, **env})


def default_of(f: dataclasses.Field) -> object:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# --- defaults -------------------------------------------------------------------------------


def test_defaults_with_only_target_url() -> None:
    s = parse()
    assert s.ais_target_url == TARGET_URL
    assert s.direct_fqn is False
    assert s.direct_put is False
    assert s.direct_put_retries == 3
    assert s.authn_token == ""
    assert s.skip_verify is False
    assert (s.client_ca, s.client_crt, s.client_crt_key) == ("", "", "")
    assert s.etl_class == ""
    assert s.timeouts == (10.0, 60.0)
    assert s.pool_maxsize == 0  # auto: sized to the worker's concurrency
    assert s.outbound_pool_size == s.worker_connections == 1000
    assert s.log_level == "INFO"
    assert s.bind == "0.0.0.0:8000"
    assert s.workers >= 1
    assert s.worker_connections == 1000
    assert s.worker_timeout == 120
    assert s.graceful_timeout == 30
    assert s.keepalive == 30
    assert s.control_socket == ""


@pytest.mark.parametrize(
    "env",
    [f.metadata["env"] for f in FIELDS.values() if default_of(f) not in ("", None)],
)
def test_every_default_parses_back_to_itself(env: str) -> None:
    f = FIELDS[env]
    default = default_of(f)
    assert f.metadata["parse"](str(default)) == default
    assert getattr(parse(**{env: str(default)}), f.name) == default


def test_defaults_written_out_equal_defaults() -> None:
    written = {
        env: str(default_of(f)) for env, f in FIELDS.items() if default_of(f) not in ("", None)
    }
    assert Settings.from_env({**BASE, **written}) == parse()


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings_env(monkeypatch, AIS_TARGET_URL=TARGET_URL, ETL_KEEPALIVE="42")
    s = Settings.from_env()
    assert (s.ais_target_url, s.keepalive) == (TARGET_URL, 42)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse().keepalive = 1  # type: ignore[misc]


# --- values, aliases, blanks ------------------------------------------------------------------


def test_target_url_trailing_slash_is_dropped() -> None:
    assert parse(AIS_TARGET_URL=TARGET_URL + "/").ais_target_url == TARGET_URL


@pytest.mark.parametrize("url", ["https://t:9080/v1/etl/_object/x/s3cr3tABCD", "http://[::1]:80"])
def test_target_url_accepts_http_and_https(url: str) -> None:
    assert parse(AIS_TARGET_URL=url).ais_target_url == url


def test_values_are_stripped() -> None:
    s = parse(AIS_DIRECT_PUT_RETRIES=" 5 ", AIS_AUTHN_TOKEN="  tok  ", ETL_LOG_LEVEL=" debug ")
    assert (s.direct_put_retries, s.authn_token, s.log_level) == (5, "tok", "DEBUG")


def test_retries_zero_is_allowed() -> None:
    assert parse(AIS_DIRECT_PUT_RETRIES="0").direct_put_retries == 0


def test_float_timeouts() -> None:
    s = parse(ETL_CONNECT_TIMEOUT="0.25", ETL_READ_TIMEOUT="3")
    assert s.timeouts == (0.25, 3.0)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"AIS_SKIP_VERIFY": "true"}, True),
        ({"AIS_SKIP_VERIFY_CRT": "yes"}, True),
        ({"AIS_SKIP_VERIFY_CRT": "false", "AIS_SKIP_VERIFY": "true"}, False),
        ({"AIS_SKIP_VERIFY_CRT": "1", "AIS_SKIP_VERIFY": "0"}, True),
        ({"AIS_SKIP_VERIFY_CRT": "  ", "AIS_SKIP_VERIFY": "on"}, True),
    ],
)
def test_skip_verify_legacy_alias_and_new_name_wins(env: dict[str, str], expected: bool) -> None:
    assert parse(**env).skip_verify is expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NUM_WORKERS": "3"}, 3),
        ({"ETL_WORKERS": "2"}, 2),
        ({"ETL_WORKERS": "2", "NUM_WORKERS": "7"}, 2),
        ({"ETL_WORKERS": "", "NUM_WORKERS": "7"}, 7),
    ],
)
def test_workers_num_workers_alias(env: dict[str, str], expected: int) -> None:
    assert parse(**env).workers == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"direct_put": "true"}, True),
        ({"DIRECT_PUT": "true"}, True),
        ({"DIRECT_PUT": "false", "direct_put": "true"}, False),
        ({"direct_put": "false"}, False),
    ],
)
def test_direct_put_lowercase_alias(env: dict[str, str], expected: bool) -> None:
    assert parse(**env).direct_put is expected


def test_workers_default_is_cpu_count() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert parse().workers == cpus


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_blank_value_counts_as_unset(blank: str) -> None:
    env = dict.fromkeys(env_names(), blank)
    env.pop("AIS_TARGET_URL")
    assert Settings.from_env({**BASE, **env}) == parse()


@pytest.mark.parametrize("blank", ["", "  "])
def test_blank_target_url_is_missing(blank: str) -> None:
    with pytest.raises(ConfigError, match="AIS_TARGET_URL"):
        Settings.from_env({"AIS_TARGET_URL": blank})


def test_tls_files_must_exist(tmp_path) -> None:
    ca, crt, key = (tmp_path / n for n in ("ca.pem", "c.crt", "c.key"))
    for p in (ca, crt, key):
        p.write_text("x")
    s = parse(AIS_CLIENT_CA=str(ca), AIS_CRT=str(crt), AIS_CRT_KEY=str(key))
    assert (s.client_ca, s.client_crt, s.client_crt_key) == (str(ca), str(crt), str(key))


def test_crt_without_key_is_accepted_with_a_warning(tmp_path, caplog) -> None:
    crt = tmp_path / "c.crt"
    crt.write_text("x")
    with caplog.at_level("WARNING", logger="etl_wsgi.config"):
        s = parse(AIS_CRT=str(crt))
    assert s.client_crt == str(crt)
    assert "AIS_CRT_KEY" in caplog.text


@pytest.mark.parametrize("bind", ["127.0.0.1:9000", "[::]:8000", ":8000", "unix:/tmp/s", "fd://3"])
def test_bind_forms(bind: str) -> None:
    assert parse(ETL_BIND=bind).bind == bind


# --- invalid values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("AIS_DIRECT_PUT_RETRIES", "-1"),
        ("AIS_DIRECT_PUT_RETRIES", "abc"),
        ("AIS_DIRECT_PUT_RETRIES", "1.5"),
        ("ETL_WORKERS", "0"),
        ("ETL_WORKERS", "-2"),
        ("NUM_WORKERS", "zero"),
        ("ETL_CONNECT_TIMEOUT", "0"),
        ("ETL_CONNECT_TIMEOUT", "nan"),
        ("ETL_CONNECT_TIMEOUT", "-1"),
        ("ETL_CONNECT_TIMEOUT", "inf"),
        ("ETL_READ_TIMEOUT", "soon"),
        ("ETL_POOL_MAXSIZE", "-1"),
        ("ETL_KEEPALIVE", "0"),
        ("ETL_WORKER_TIMEOUT", "2m"),
        ("ETL_LOG_LEVEL", "LOUD"),
        ("AIS_TARGET_URL", "ftp://10.0.0.1/v1"),
        ("AIS_TARGET_URL", "10.0.0.1:9080"),
        ("AIS_TARGET_URL", "http://"),
        ("AIS_CLIENT_CA", "/nonexistent/ca.pem"),
        ("AIS_CRT", "/nonexistent/c.crt"),
        ("ETL_BIND", "garbage"),
        ("ETL_BIND", "0.0.0.0:99999"),
        ("ETL_BIND", "0.0.0.0:http"),
    ],
)
def test_invalid_value_raises_config_error_naming_the_variable(env: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(**{env: value})
    message = str(info.value)
    assert message.startswith(f"{env}={value!r}: ")
    assert FIELDS_BY_ANY_NAME[env].metadata["doc"] in message


def test_client_ca_directory_is_not_a_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="AIS_CLIENT_CA"):
        parse(AIS_CLIENT_CA=str(tmp_path))


def test_first_bad_value_is_reported_even_behind_a_good_alias() -> None:
    with pytest.raises(ConfigError, match=r"^ETL_WORKERS="):
        parse(ETL_WORKERS="0", NUM_WORKERS="4")


def test_missing_target_url_is_an_environment_error() -> None:
    with pytest.raises(EnvironmentError) as info:
        Settings.from_env({})
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, OSError)
    assert "AIS_TARGET_URL" in str(info.value)


def test_missing_target_url_allowed_when_not_required() -> None:
    s = Settings.from_env({"ETL_WORKERS": "2"}, require_target=False)
    assert (s.ais_target_url, s.workers) == ("", 2)


def test_bad_target_url_rejected_even_when_not_required() -> None:
    with pytest.raises(ConfigError, match="AIS_TARGET_URL"):
        Settings.from_env({"AIS_TARGET_URL": "nope"}, require_target=False)


# --- parse_bool ------------------------------------------------------------------------------


def test_truthy_set_is_the_sdk_one() -> None:
    assert frozenset({"1", "t", "true", "y", "yes", "on"}) == TRUTHY


@pytest.mark.parametrize(
    "value",
    [*TRUTHY, "TRUE", "True", " yes ", "ON\n", "\tY", "T"],
)
def test_parse_bool_truthy(value: str) -> None:
    assert parse_bool(value) is True


@pytest.mark.parametrize(
    "value",
    [None, "", " ", "0", "f", "false", "no", "off", "n", "2", "tru", "yess", "enable", "1.0"],
)
def test_parse_bool_falsy(value: str | None) -> None:
    assert parse_bool(value) is False


def test_bool_settings_use_sdk_truthiness() -> None:
    assert parse(ETL_DIRECT_FQN="Yes").direct_fqn is True
    assert parse(ETL_DIRECT_FQN="maybe").direct_fqn is False


# --- settings_table ---------------------------------------------------------------------------


def test_settings_table_lists_every_env_name() -> None:
    table = settings_table()
    for name in env_names():
        assert f"`{name}`" in table
    # header, separator, one row per setting
    assert len(table.splitlines()) == 2 + len(FIELDS)


def test_settings_table_rows() -> None:
    rows = {line.split(" | ")[0].lstrip("| "): line for line in settings_table().splitlines()}
    assert "| required |" in rows["`AIS_TARGET_URL`"]
    assert "| `3` |" in rows["`AIS_DIRECT_PUT_RETRIES`"]
    assert "| CPUs available |" in rows["`ETL_WORKERS` / `NUM_WORKERS`"]
    assert "| unset |" in rows["`AIS_AUTHN_TOKEN`"]
    assert "| `0.0.0.0:8000` |" in rows["`ETL_BIND`"]
    assert "(legacy name `AIS_SKIP_VERIFY`)" in rows["`AIS_SKIP_VERIFY_CRT` / `AIS_SKIP_VERIFY`"]


def test_class_and_class_payload_together_are_refused() -> None:
    env = {"ETL_CLASS": "my_etl:Upper", "ETL_CLASS_PAYLOAD": "gASV"}
    with pytest.raises(ConfigError, match="Set only one of ETL_CLASS and ETL_CLASS_PAYLOAD"):
        Settings.from_env(env, require_target=False)
    assert Settings.from_env({"ETL_CLASS": "my_etl:Upper"}, require_target=False).etl_class
