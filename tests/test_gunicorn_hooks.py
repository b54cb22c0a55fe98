"""etl_wsgi.gunicorn_hooks: gunicorn settings from the environment; master-process side effects."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from gunicorn.config import Config
from gunicorn.errors import AppImportError

from etl_wsgi import gunicorn_hooks
from etl_wsgi.config import ConfigError, Settings
from etl_wsgi.gunicorn_hooks import (
    LOG_FORMAT,
    GunicornLogger,
    JsonFormatter,
    RedactingFormatter,
    balance_listeners,
    child_exit,
    config_values,
    configure_logging,
    make_formatter,
    on_exit,
    on_starting,
    prepare_metrics_dir,
    raise_nofile_limit,
    when_ready,
    worker_exit,
)
from tests.unit_support import TARGET_URL, clear_settings_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    clear_settings_env(monkeypatch)
    return monkeypatch


@pytest.fixture
def restore_process_state() -> Iterator[None]:
    """on_starting changes the root log level, RLIMIT_NOFILE and warnings capture: put back."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    logging.captureWarnings(False)


# --- config_values ---------------------------------------------------------------------------


def test_config_values_defaults(clean_env) -> None:
    values = config_values()
    assert values["worker_class"] == "gevent"
    assert values["bind"] == ["0.0.0.0:8000"]
    assert values["workers"] >= 1
    assert values["worker_connections"] == 1000
    # keep-alive must outlive the target's 6 s idle timeout (PROTOCOL.md §9.1)
    assert values["keepalive"] == 30
    assert values["keepalive"] > 6
    # a worker must not be killed while AIS still waits for it (obj_timeout 45 s)
    assert values["timeout"] == 120
    assert values["timeout"] >= 45
    assert values["graceful_timeout"] == 30
    assert values["loglevel"] == "info"
    assert values["accesslog"] is None
    assert values["errorlog"] == "-"
    assert values["control_socket_disable"] is True
    assert "control_socket" not in values
    assert values["limit_request_line"] == 8190
    assert values["reuse_port"] is True


def test_config_values_from_environment(clean_env) -> None:
    clean_env.setenv("ETL_BIND", "fd://3")
    clean_env.setenv("NUM_WORKERS", "5")
    clean_env.setenv("ETL_WORKER_CONNECTIONS", "50")
    clean_env.setenv("ETL_KEEPALIVE", "75")
    clean_env.setenv("ETL_WORKER_TIMEOUT", "300")
    clean_env.setenv("ETL_GRACEFUL_TIMEOUT", "5")
    clean_env.setenv("ETL_LOG_LEVEL", "debug")
    clean_env.setenv("ETL_CONTROL_SOCKET", "/run/etl/gunicorn.ctl")
    clean_env.setenv("ETL_REUSE_PORT", "off")
    values = config_values()
    assert values["bind"] == ["fd://3"]
    assert values["workers"] == 5
    assert values["worker_connections"] == 50
    assert (values["keepalive"], values["timeout"], values["graceful_timeout"]) == (75, 300, 5)
    assert values["loglevel"] == "debug"
    assert values["control_socket"] == "/run/etl/gunicorn.ctl"
    assert "control_socket_disable" not in values
    assert values["reuse_port"] is False


def test_config_values_do_not_need_the_target_url(clean_env) -> None:
    assert "AIS_TARGET_URL" not in os.environ
    assert config_values()["worker_class"] == "gevent"


def test_config_values_exit_on_a_bad_setting(clean_env, capsys) -> None:
    clean_env.setenv("ETL_WORKERS", "0")
    with pytest.raises(SystemExit) as info:
        config_values()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("etl-wsgi: invalid configuration: ETL_WORKERS='0': ")


# --- on_starting / when_ready ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, "AIS_TARGET_URL"),
        ({"AIS_TARGET_URL": "ftp://t/x"}, "AIS_TARGET_URL"),
        ({"AIS_TARGET_URL": TARGET_URL, "AIS_DIRECT_PUT_RETRIES": "-1"}, "AIS_DIRECT_PUT_RETRIES"),
        ({"AIS_TARGET_URL": TARGET_URL, "ETL_CONNECT_TIMEOUT": "nan"}, "ETL_CONNECT_TIMEOUT"),
    ],
)
def test_on_starting_exits_naming_the_variable(clean_env, capsys, env, name) -> None:
    for key, value in env.items():
        clean_env.setenv(key, value)
    with pytest.raises(SystemExit) as info:
        on_starting(None)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("etl-wsgi: invalid configuration: ")
    assert name in err
    assert err.count("\n") == 1  # one clear line


def test_on_starting_configures_the_process(clean_env, restore_process_state, caplog) -> None:
    clean_env.setenv("AIS_TARGET_URL", TARGET_URL)
    clean_env.setenv("ETL_LOG_LEVEL", "warning")
    clean_env.setenv("ETL_WORKERS", "3")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    clean_env.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # on_starting exports one: restored
    with caplog.at_level(logging.INFO, logger="etl_wsgi"):
        on_starting(None)
    on_exit(None)
    assert logging.getLogger().level == logging.WARNING
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    assert "3 gevent worker(s) x 1000 connections" in caplog.text
    assert "metrics /" in caplog.text


# --- balance_listeners: a socket per worker (SO_REUSEPORT) where it balances ----------------


def gunicorn_config(bind: str, workers: int = 2, reuse_port: bool = True) -> Config:
    cfg = Config()
    cfg.set("bind", [bind])
    cfg.set("workers", workers)
    cfg.set("reuse_port", reuse_port)
    return cfg


@pytest.fixture
def free_port() -> Iterator[int]:
    """A port held like etl_wsgi.testing holds it: bound with SO_REUSEPORT, not listening."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_reuse_port_stays_on_for_several_workers_on_a_fixed_port(free_port: int) -> None:
    cfg = gunicorn_config(f"127.0.0.1:{free_port}")
    assert balance_listeners(cfg) == ""
    assert cfg.reuse_port is True


@pytest.mark.parametrize(
    ("bind", "workers", "reason"),
    [
        ("127.0.0.1:8000", 1, "one worker"),
        ("127.0.0.1:0", 2, "port 0"),
        ("unix:/tmp/etl.sock", 2, "is not HOST:PORT"),
        ("fd://3", 2, "is not HOST:PORT"),
    ],
)
def test_reuse_port_is_turned_off_where_it_cannot_balance(
    bind: str, workers: int, reason: str
) -> None:
    cfg = gunicorn_config(bind, workers)
    assert reason in balance_listeners(cfg)
    assert cfg.reuse_port is False  # gunicorn's master binds one shared socket, as before


def test_reuse_port_is_off_when_another_program_holds_the_port() -> None:
    """Without SO_REUSEPORT the holder keeps the port: gunicorn's own bind reports it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        cfg = gunicorn_config(f"127.0.0.1:{port}")
        reason = balance_listeners(cfg)
    assert reason.startswith(f"cannot bind 127.0.0.1:{port} with SO_REUSEPORT: ")
    assert cfg.reuse_port is False


def test_reuse_port_off_by_setting_stays_off(free_port: int) -> None:
    cfg = gunicorn_config(f"127.0.0.1:{free_port}", reuse_port=False)
    assert balance_listeners(cfg) == "ETL_REUSE_PORT is off"
    assert cfg.reuse_port is False


def test_on_starting_says_how_it_listens(clean_env, restore_process_state, caplog) -> None:
    clean_env.setenv("AIS_TARGET_URL", TARGET_URL)
    clean_env.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # on_starting exports one: restored
    arbiter = SimpleNamespace(cfg=gunicorn_config("unix:/tmp/etl.sock"))
    with caplog.at_level(logging.INFO, logger="etl_wsgi"):
        on_starting(arbiter)
    on_exit(None)
    shared = "listening at unix:/tmp/etl.sock on one socket shared by the workers (bind "
    assert shared in caplog.text


# --- metrics directory (prometheus_client multiprocess mode) -----------------------------------


def test_private_metrics_dir_is_exported_then_removed(clean_env) -> None:
    clean_env.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # restored at teardown
    directory = prepare_metrics_dir(Settings.from_env(require_target=False))
    assert os.path.isdir(directory)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == directory  # the workers inherit it
    on_exit(None)
    assert not os.path.exists(directory)


def test_given_metrics_dir_is_wiped_of_stale_files_and_kept(clean_env, tmp_path: Path) -> None:
    (tmp_path / "counter_1.db").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("not ours")
    clean_env.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert prepare_metrics_dir(Settings.from_env(require_target=False)) == str(tmp_path)
    on_exit(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_metrics_off_leaves_the_dir_alone(clean_env, tmp_path: Path) -> None:
    (tmp_path / "counter_1.db").write_bytes(b"old")
    clean_env.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    clean_env.setenv("ETL_METRICS", "off")
    assert prepare_metrics_dir(Settings.from_env(require_target=False)) == ""
    child_exit(None, SimpleNamespace(pid=1))
    assert (tmp_path / "counter_1.db").exists()


def test_child_exit_drops_only_the_dead_workers_live_gauges(clean_env, tmp_path: Path) -> None:
    names = ["gauge_livesum_123.db", "gauge_livesum_1234.db", "counter_123.db", "gauge_all_123.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    clean_env.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    prepare_metrics_dir(Settings.from_env(require_target=False))  # wipes: create them again
    for name in names:
        (tmp_path / name).write_bytes(b"")
    child_exit(None, SimpleNamespace(pid=123))
    on_exit(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


# --- log format ------------------------------------------------------------------------------


def test_json_formatter_fields_and_redaction() -> None:
    formatter = make_formatter("json", TARGET_URL)
    secret = TARGET_URL.rsplit("/", 1)[1]
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "GET %s failed", (TARGET_URL,), None
    )
    record.path, record.cause, record.status = "b/o", f"no route to {TARGET_URL}", 502
    try:
        raise ValueError(f"inner {secret}")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "\n" not in line  # one line per record, the traceback included
    entry = json.loads(line)
    assert secret not in line
    assert entry["message"] == f"GET {TARGET_URL.replace(secret, '***')} failed"
    assert (entry["level"], entry["logger"], entry["path"], entry["status"]) == (
        "ERROR",
        "x",
        "b/o",
        502,
    )
    assert entry["cause"].endswith("/***")
    assert "ValueError: inner ***" in entry["exc"]
    assert entry["pid"] == os.getpid()


def test_plain_formatter_is_the_redacting_one() -> None:
    formatter = make_formatter("plain", TARGET_URL)
    assert isinstance(formatter, RedactingFormatter)
    assert formatter._fmt == LOG_FORMAT


def test_gunicorn_logger_uses_our_format(clean_env) -> None:
    from gunicorn.config import Config

    clean_env.setenv("ETL_LOG_FORMAT", "json")
    cfg = Config()
    cfg.set("errorlog", "-")
    cfg.set("accesslog", "-")
    error_log, access_log = (
        logging.getLogger("gunicorn.error"),
        logging.getLogger("gunicorn.access"),
    )
    saved = (list(error_log.handlers), list(access_log.handlers))
    try:
        logger = GunicornLogger(cfg)
        handlers = logger.error_log.handlers + logger.access_log.handlers
        assert handlers
        assert all(isinstance(h.formatter, JsonFormatter) for h in handlers)
    finally:
        error_log.handlers[:], access_log.handlers[:] = saved


def test_access_log_is_off_unless_asked(clean_env) -> None:
    assert config_values()["accesslog"] is None
    clean_env.setenv("ETL_ACCESS_LOG", "1")
    assert config_values()["accesslog"] == "-"
    assert config_values()["logger_class"] == "etl_wsgi.gunicorn_hooks.GunicornLogger"


def test_when_ready_warns_if_requests_is_in_the_master(caplog) -> None:
    import requests  # noqa: F401 - what preload_app would do to the master

    with caplog.at_level(logging.WARNING, logger="etl_wsgi"):
        when_ready(None)
    assert "'requests' was imported in the gunicorn master" in caplog.text


def test_worker_exit_writes_the_batched_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import generate_latest

    from etl_wsgi import metrics

    monkeypatch.setattr(metrics, "_recorder", None)
    worker_exit(None, None)  # no recorder (metrics off, or nothing recorded): nothing to do
    rec = metrics.Recorder("", batched=True, schedule=lambda seconds, fn: None)
    metrics._recorder = rec
    rec.start("PUT", "/<path>")
    rec.start("PUT", "/<path>").finish(200)  # busy: batched, the timer never fires here
    line = 'etl_requests_total{method="PUT",route="/<path>",status="200"} 1.0'
    assert line not in generate_latest(rec.registry).decode()
    worker_exit(None, None)
    assert line in generate_latest(rec.registry).decode()


# --- side effects ------------------------------------------------------------------------------


def test_raise_nofile_limit(restore_process_state) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    assert raise_nofile_limit() == (hard, hard)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    assert raise_nofile_limit() == (hard, hard)  # already raised: no-op


def test_configure_logging_adds_one_handler_only_when_none(restore_process_state) -> None:
    root = logging.getLogger()
    root.handlers[:] = []
    configure_logging("DEBUG")
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    assert handler.formatter is not None
    assert handler.formatter._fmt == LOG_FORMAT
    assert root.level == logging.DEBUG
    configure_logging("ERROR")
    assert root.handlers == [handler]
    assert root.level == logging.ERROR


# --- import hygiene (STYLE.md: the master must not import requests/ssl before gevent patches) ----


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIS_", "ETL_")) and k not in ("NUM_WORKERS", "DIRECT_PUT")
    }
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def _imported_after(code: str) -> set[str]:
    probe = (
        f"{code}\nimport sys\n"
        "print(' '.join(m for m in ('requests', 'flask', 'ssl', 'urllib3', 'werkzeug') "
        "if m in sys.modules))"
    )
    return set(_run(probe).stdout.split())


def test_importing_the_package_and_hooks_stays_light() -> None:
    assert _imported_after("import etl_wsgi, etl_wsgi.gunicorn_hooks, etl_wsgi.config") == set()


def test_loading_the_gunicorn_config_stays_light() -> None:
    loaded = _imported_after(
        "import runpy\nrunpy.run_path('gunicorn.conf.py')\nimport etl_wsgi.gunicorn_conf"
    )
    assert not loaded & {"requests", "flask"}


def test_lazy_package_attribute_loads_on_use() -> None:
    assert "requests" in _imported_after("import etl_wsgi\netl_wsgi.ETLServer")


def test_when_ready_is_quiet_in_a_clean_master() -> None:
    out = _run(
        "import logging\nlogging.basicConfig()\n"
        "from etl_wsgi.gunicorn_hooks import when_ready\nwhen_ready(None)"
    )
    assert out.stderr == ""


def test_module_logger_name() -> None:
    assert gunicorn_hooks.log.name == "etl_wsgi"


# --- a bad ETL_CLASS in a worker (create_app) -----------------------------------------------------


@pytest.fixture
def as_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """This process as gunicorn worker ``age`` 1 (``post_fork``); SIGTERM's handler restored."""
    worker = SimpleNamespace(age=1, alive=True, booted=False)
    monkeypatch.setattr(gunicorn_hooks, "_worker", None)
    gunicorn_hooks.post_fork(None, worker)
    handler = signal.getsignal(signal.SIGTERM)
    yield worker
    signal.signal(signal.SIGTERM, handler)


def test_app_load_error_outside_a_worker_is_the_error_itself(monkeypatch) -> None:
    monkeypatch.setattr(gunicorn_hooks, "_worker", None)
    exc = ConfigError("ETL_CLASS: bad")
    assert gunicorn_hooks.app_load_error(exc) is exc


def test_app_load_error_after_the_boot_is_the_error_itself(as_worker) -> None:
    """``create_app`` called by a serving worker (an app of the user's): no wait, SIGTERM kept."""
    as_worker.age, as_worker.booted = 2, True
    handler = signal.getsignal(signal.SIGTERM)
    exc = ConfigError("ETL_CLASS: bad")
    assert gunicorn_hooks.app_load_error(exc) is exc
    assert signal.getsignal(signal.SIGTERM) is handler


def test_app_load_error_in_the_first_worker_is_gunicorns_app_import_error(as_worker) -> None:
    error = gunicorn_hooks.app_load_error(ConfigError("ETL_CLASS: bad"))
    assert isinstance(error, ConfigError) and isinstance(error, AppImportError)
    assert str(error) == "etl-wsgi: ETL_CLASS: bad"  # what gunicorn prints, alone


def test_app_load_error_in_a_later_worker_waits_for_the_halt(as_worker, monkeypatch) -> None:
    as_worker.age, as_worker.alive = 2, False  # the master's SIGTERM came first
    error = gunicorn_hooks.app_load_error(ConfigError("ETL_CLASS: bad"))
    assert isinstance(error, SystemExit) and error.code == 0  # quietly: the master halts
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a later SIGTERM ends it too

    as_worker.alive = True  # no halt under way: it failed alone, so it reports after the wait
    monkeypatch.setattr(gunicorn_hooks, "APP_LOAD_REPORT_WAIT", 0.0)
    error = gunicorn_hooks.app_load_error(ConfigError("ETL_CLASS: bad"))
    assert isinstance(error, ConfigError) and str(error) == "etl-wsgi: ETL_CLASS: bad"
