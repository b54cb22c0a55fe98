"""Process-level side effects for the gunicorn entry point, used by ``gunicorn.conf.py``.

Runs in the gunicorn **master**, before gevent patches the workers: it imports only
:mod:`etl_wsgi.config` (pure) and the standard library - never ``requests``, Flask or the user's
class (PROTOCOL.md §9.2 #6 for the open-files limit; STYLE.md "side effects live in hooks").
"""

from __future__ import annotations

import logging
import resource
import signal
import sys
from collections.abc import Mapping
from typing import Any

from etl_wsgi.config import ConfigError, Settings
from etl_wsgi.protocol import redact_secret

log = logging.getLogger("etl_wsgi")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


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
        # gunicorn's maximum: an hpush request line carries the object name twice (path and the
        # doubly-escaped etl_fqn), which long names push past the 4094 default.
        "limit_request_line": 8190,
        "loglevel": s.log_level.lower(),
        "accesslog": None,
        "errorlog": "-",
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


def configure_logging(level: str, host_target: str = "", token: str = "") -> None:
    """Plain logs to stderr for the library and the transformer's ``self.logger``."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RedactingFormatter(LOG_FORMAT, host_target, token))
        root.addHandler(handler)
    root.setLevel(level)


def on_starting(server: Any) -> None:
    """Master, once: validate every setting (AIS_TARGET_URL included), logging, rlimit."""
    s = _settings(require_target=True)
    configure_logging(s.log_level, s.ais_target_url, s.authn_token)
    soft, _ = raise_nofile_limit()
    log.info(
        "etl-wsgi: %d gevent worker(s) x %d connections, timeout %ds, keep-alive %ds, nofile %d",
        s.workers,
        s.worker_connections,
        s.worker_timeout,
        s.keepalive,
        soft,
    )
    log.info(
        "etl-wsgi: ETL_FQN_ROOTS=%s, ETL_ALLOWED_DESTINATIONS=%s, serving %s",
        s.fqn_roots or "(any path)",
        s.allowed_destinations or "(any host)",
        "HTTPS" if s.certfile else "HTTP",
    )


def post_worker_init(worker: Any) -> None:
    """Worker: on SIGTERM also tell long-lived work to wind down (:mod:`etl_wsgi.lifecycle`)."""
    from etl_wsgi import lifecycle

    lifecycle.start_watcher()
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(sig: int, frame: Any) -> None:
        if callable(previous):
            previous(sig, frame)
        lifecycle.notify_stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.siginterrupt(signal.SIGTERM, False)


def when_ready(server: Any) -> None:
    """Master: warn if anything pulled ``requests`` in before the workers fork and patch."""
    if "requests" in sys.modules:
        log.warning(
            "etl-wsgi: 'requests' was imported in the gunicorn master (preload_app?); "
            "gevent patches it too late in the workers"
        )
