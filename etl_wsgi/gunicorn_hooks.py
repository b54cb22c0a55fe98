"""Process-level side effects for the gunicorn entry point, used by ``gunicorn.conf.py``.

Runs in the gunicorn **master**, before gevent patches the workers: it imports only
:mod:`etl_wsgi.config` (pure), gunicorn's logger and the standard library - never ``requests``,
Flask, prometheus_client (it imports ``ssl``) or the user's class (PROTOCOL.md §9.2 #6 for the
open-files limit; STYLE.md "side effects live in hooks").

Logging: one format for every line of the process (``ETL_LOG_FORMAT``: plain text or one JSON
object per line), gunicorn's own lines included (:class:`GunicornLogger`), the per-ETL secret
redacted everywhere.  Metrics: the master owns prometheus_client's multiprocess directory
(:func:`on_starting` creates or wipes it, :func:`child_exit` drops a dead worker's live gauges,
:func:`on_exit` removes a directory it created).
"""

from __future__ import annotations

import datetime
import gc
import glob
import json
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from gunicorn.errors import AppImportError
from gunicorn.glogging import Logger as _GunicornBaseLogger

from etl_wsgi.config import ConfigError, Settings
from etl_wsgi.protocol import redact_secret

log = logging.getLogger("etl_wsgi")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"

#: Record attributes a JSON line carries as fields when set (``extra=`` of a log call).
JSON_FIELDS = ("method", "path", "status", "cause")

#: prometheus_client's live gauge modes (``multiprocess._LIVE_GAUGE_MULTIPROCESS_MODES``).
LIVE_GAUGE_MODES = ("liveall", "livemin", "livemax", "livesum", "livemostrecent")

#: The multiprocess directory of this server, and whether the master created it.
_metrics_dir = ""
_metrics_dir_is_private = False

#: This process's gunicorn worker (``post_fork``); ``None`` in the master and outside gunicorn.
_worker: Any = None

#: How long a worker other than the first, whose app failed to load, waits for the master's
#: ``SIGTERM`` before reporting the failure itself (:func:`app_load_error`).
APP_LOAD_REPORT_WAIT = 5.0


def _settings(require_target: bool, environ: Mapping[str, str] | None = None) -> Settings:
    try:
        return Settings.from_env(environ, require_target=require_target)
    except ConfigError as exc:
        # SystemExit passes through gunicorn's config loader and hook runner: one clear line.
        print(f"etl-wsgi: invalid configuration: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def config_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """gunicorn settings from the environment, for ``globals().update(...)`` in gunicorn.conf.py.

    ``environ`` (default ``os.environ``) lets ``etl-wsgi check`` show them for other values.
    """
    s = _settings(require_target=False, environ=environ)
    values: dict[str, Any] = {
        "bind": [s.bind],
        "workers": s.workers,
        "worker_class": "gevent",
        "worker_connections": s.worker_connections,
        "timeout": s.worker_timeout,
        "graceful_timeout": s.graceful_timeout,
        "keepalive": s.keepalive,
        # on_starting turns it off again for binds it cannot serve (see balance_listeners)
        "reuse_port": s.reuse_port,
        # gunicorn's maximum: an hpush request line carries the object name twice (path and the
        # doubly-escaped etl_fqn), which long names push past the 4094 default.
        "limit_request_line": 8190,
        "loglevel": s.log_level.lower(),
        # None: gunicorn skips building access-log records altogether (no per-request cost).
        "accesslog": "-" if s.access_log else None,
        "errorlog": "-",
        "logger_class": "etl_wsgi.gunicorn_hooks.GunicornLogger",
    }
    if s.certfile:  # both or neither: Settings.from_env checked
        values["certfile"] = s.certfile
        values["keyfile"] = s.keyfile
    if s.control_socket:
        values["control_socket"] = s.control_socket
    else:
        values["control_socket_disable"] = True
    return values


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the open-files soft limit to the hard limit (CRI-O defaults soft to 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, exc)
            return soft, hard
    return hard, hard


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then hides the per-ETL secret of ``AIS_TARGET_URL``.

    Exception texts from ``requests`` carry full URLs, and every URL towards a target holds the
    secret; pod logs are read by more people than the ETL's owner.  ``AIS_AUTHN_TOKEN`` is
    hidden too (etl-wsgi never logs it; a transformer or library might).
    """

    def __init__(self, fmt: str, host_target: str, token: str = "") -> None:
        super().__init__(fmt)
        self.host_target = host_target
        self.token = token

    def format(self, record: logging.LogRecord) -> str:
        return redact_secret(super().format(record), self.host_target, self.token)


class JsonFormatter(RedactingFormatter):
    """One JSON object per line: ``time level logger pid message``, the request fields of
    :data:`JSON_FIELDS` when the record has them, ``exc`` with a traceback; secret redacted.
    """

    def __init__(self, host_target: str, token: str = "") -> None:
        super().__init__("%(message)s", host_target, token)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in JSON_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        text = json.dumps(entry, default=str)
        # After encoding: the secret is a URL path segment, which JSON does not escape.
        return redact_secret(text, self.host_target, self.token)


def make_formatter(log_format: str, host_target: str, token: str = "") -> logging.Formatter:
    """The formatter of ``ETL_LOG_FORMAT`` (``plain`` or ``json``), redacting the secrets."""
    if log_format == "json":
        return JsonFormatter(host_target, token)
    return RedactingFormatter(LOG_FORMAT, host_target, token)


def configure_logging(
    level: str, host_target: str = "", log_format: str = "plain", token: str = ""
) -> None:
    """Logs to stderr for the library and the transformer's ``self.logger``.

    Python warnings become log records too (logger ``py.warnings``), in the same format.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(make_formatter(log_format, host_target, token))
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


class GunicornLogger(_GunicornBaseLogger):
    """gunicorn's logger, its lines in our format (``logger_class`` in :func:`config_values`).

    gunicorn keeps its own handlers on ``gunicorn.error`` / ``gunicorn.access``; they get the
    same formatter as the application's lines, so a JSON log is JSON throughout.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        s = _settings(require_target=False)
        formatter = make_formatter(s.log_format, s.ais_target_url, s.authn_token)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(formatter)


def prepare_metrics_dir(s: Settings) -> str:
    """The master, before forking: a clean multiprocess directory for prometheus_client.

    Unset ``PROMETHEUS_MULTIPROC_DIR``: a private temporary directory, exported to the workers
    (they inherit the environment) and removed by :func:`on_exit`.  Set: its ``*.db`` files from
    a previous run are removed (prometheus_client requires a wiped directory).
    """
    global _metrics_dir, _metrics_dir_is_private
    if not s.metrics:
        return ""
    if s.prometheus_multiproc_dir:
        _metrics_dir, _metrics_dir_is_private = s.prometheus_multiproc_dir, False
        for stale in glob.glob(os.path.join(_metrics_dir, "*.db")):
            os.remove(stale)
    else:
        _metrics_dir = tempfile.mkdtemp(prefix="etl-wsgi-metrics-")
        _metrics_dir_is_private = True
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
    return _metrics_dir


def mark_process_dead(pid: int, directory: str) -> None:
    """Drop a dead worker's live gauges (its in-flight count); its counters stay in the sums.

    Same as ``prometheus_client.multiprocess.mark_process_dead``, which the master cannot import:
    prometheus_client imports ``ssl``, and workers forked later would inherit it unpatched.
    """
    for mode in LIVE_GAUGE_MODES:
        for path in glob.glob(os.path.join(directory, f"gauge_{mode}_{pid}.db")):
            os.remove(path)


def on_starting(server: Any) -> None:
    """Master, once: validate every setting (AIS_TARGET_URL included), logging, rlimit, metrics."""
    s = _settings(require_target=True)
    configure_logging(s.log_level, s.ais_target_url, s.log_format, s.authn_token)
    soft, _ = raise_nofile_limit()
    metrics_dir = prepare_metrics_dir(s)
    log.info(
        "etl-wsgi: %d gevent worker(s) x %d connections, timeout %ds, keep-alive %ds, "
        "graceful %ds, nofile %d, metrics %s",
        s.workers,
        s.worker_connections,
        s.worker_timeout,
        s.keepalive,
        s.graceful_timeout,
        soft,
        metrics_dir or "off",
    )
    log.info(
        "etl-wsgi: ETL_FQN_ROOTS=%s, ETL_ALLOWED_DESTINATIONS=%s, serving %s",
        s.fqn_roots or "(any path)",
        s.allowed_destinations or "(any host)",
        "HTTPS" if s.certfile else "HTTP",
    )
    if server is not None:  # the arbiter; unit tests of the steps above pass None
        shared = balance_listeners(server.cfg)
        log.info(
            "etl-wsgi: listening at %s %s",
            ", ".join(server.cfg.bind),
            f"on one socket shared by the workers ({shared})"
            if shared
            else "on a socket per worker (SO_REUSEPORT)",
        )


def balance_listeners(cfg: Any) -> str:
    """Keep gunicorn's ``reuse_port`` (``ETL_REUSE_PORT``) only where it balances the workers.

    With it, every worker binds the address itself (``SO_REUSEPORT``) and the kernel hashes each
    new connection to one of their sockets: with 64 keep-alive connections from wrk, one shared
    socket let the first worker to wake take 47 or all 64 of them in some runs (p99 12-15 ms),
    separate sockets split them 22/42 to 33/31 (p99 8 ms).  Off, with one shared socket as
    before, for a single worker (the master's socket then queues connections while a worker
    restarts), for ``unix:``/``fd://`` binds and port 0 (every worker would get a port of its
    own), and when the master cannot bind the address with ``SO_REUSEPORT`` itself (in use by
    another program: gunicorn's own bind then reports it).  Returns why it is off ("" if on).
    """
    if not cfg.reuse_port:
        return "ETL_REUSE_PORT is off"
    reason = _reuse_port_refusal(cfg)
    if reason:
        cfg.set("reuse_port", False)
    return reason


def _reuse_port_refusal(cfg: Any) -> str:
    if cfg.workers < 2:
        return "one worker"
    if not hasattr(socket, "SO_REUSEPORT"):
        return "no SO_REUSEPORT on this system"
    for address in cfg.address:
        if not isinstance(address, tuple):
            return f"bind {address!r} is not HOST:PORT"
        host, port = address[0], address[1]
        if port == 0:
            return "port 0 would give every worker a port of its own"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                probe.bind(address)
        except OSError as exc:
            return f"cannot bind {host}:{port} with SO_REUSEPORT: {exc.strerror or exc}"
    return ""


def child_exit(server: Any, worker: Any) -> None:
    """Master, after a worker exited (crash, kill, restart, shutdown): forget its live gauges."""
    if _metrics_dir:
        mark_process_dead(worker.pid, _metrics_dir)


def on_exit(server: Any) -> None:
    """Master, last: remove the metrics directory if it created it."""
    global _metrics_dir
    if _metrics_dir and _metrics_dir_is_private:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
        _metrics_dir = ""


def post_fork(server: Any, worker: Any) -> None:
    """Worker, right after the fork: remember the worker (:func:`app_load_error`)."""
    global _worker
    _worker = worker


class AppLoadError(ConfigError, AppImportError):
    """A bad ``ETL_CLASS`` / ``ETL_CLASS_PAYLOAD`` as gunicorn's "App failed to load": gunicorn
    prints the message alone (no traceback), the worker exits with code 4 and the master halts."""


def app_load_error(exc: ConfigError) -> BaseException:
    """What ``create_app`` raises for ``exc`` (a bad ``ETL_CLASS``): one line for the server.

    Outside a gunicorn worker's boot (a Flask app, ``--check-config``, tests, an app of the
    user's calling ``create_app`` once serving) ``exc`` itself.  While a worker loads the app an
    :class:`AppLoadError`, reported by the first worker only: when a second worker
    also exits with code 4 while the master halts, gunicorn raises its ``HaltServer`` again
    inside the halt and exits with status 1 and a traceback (seen in 3 of 6 starts with two
    workers).  So a later worker waits for the master's halt to stop it: with ``SIGTERM``'s
    default action (ending quietly), or at once with status 0 if the ``SIGTERM`` came before
    (gunicorn's handler only clears ``alive``).  It reports itself only after
    :data:`APP_LOAD_REPORT_WAIT` seconds: then its load failed alone (a worker spawned later).
    """
    worker = _worker
    if worker is None or worker.booted:
        return exc
    if worker.age > 1:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if not worker.alive:
            return SystemExit(0)
        time.sleep(APP_LOAD_REPORT_WAIT)
    return AppLoadError(f"etl-wsgi: {exc}")


def post_worker_init(worker: Any) -> None:
    """Worker: on SIGTERM also tell long-lived work to wind down (:mod:`etl_wsgi.lifecycle`).

    Also builds the worker's metrics now (prometheus_client's import and files), not in the
    first request, writes replies with fewer copies and sends (:mod:`etl_wsgi.reply_writes`),
    parses requests with less per-request lookup (:mod:`etl_wsgi.worker_tuning`), and
    freezes what the worker holds after start-up out of the garbage collector's way
    (``gc.freeze``): every full collection walked the whole of Flask, Werkzeug, gevent and
    the app again; frozen, wrk 1 KiB hpush p99 went from 22-27 ms to 10-11 ms (p50 5 ms).
    """
    from etl_wsgi import lifecycle, metrics, reply_writes, worker_tuning

    reply_writes.install()
    worker_tuning.install(worker.cfg)

    metrics.recorder(_settings(require_target=False))
    lifecycle.start_watcher()
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(sig: int, frame: Any) -> None:
        if callable(previous):
            previous(sig, frame)
        lifecycle.notify_stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.siginterrupt(signal.SIGTERM, False)
    gc.collect()
    gc.freeze()


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, on its way out: write the metric updates it still batches (etl_wsgi.metrics)."""
    from etl_wsgi import metrics

    metrics.flush()


def when_ready(server: Any) -> None:
    """Master: warn if anything pulled ``requests`` in before the workers fork and patch."""
    if "requests" in sys.modules:
        log.warning(
            "etl-wsgi: 'requests' was imported in the gunicorn master (preload_app?); "
            "gevent patches it too late in the workers"
        )
