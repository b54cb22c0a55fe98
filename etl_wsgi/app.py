"""``create_app``: the gunicorn entry point.

    gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app("pkg.mod:Class")'

gunicorn imports this in each worker *after* gevent has patched the standard library, so the
outbound session built here is cooperative.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from werkzeug.utils import ImportStringError, import_string

from etl_wsgi.base_etl_server import ETLServer
from etl_wsgi.config import ConfigError, Settings
from etl_wsgi.extension import ETLExtension
from etl_wsgi.fastpath import ObjectRoutes
from etl_wsgi.gunicorn_hooks import app_load_error


def resolve_etl(etl: Any = None) -> ETLServer:
    """An ``ETLServer`` instance from a subclass, an instance, or ``"pkg.mod:Class"``.

    ``None`` reads the ``ETL_CLASS`` or ``ETL_CLASS_PAYLOAD`` setting.  A string may also name a
    module-level instance.
    """
    setting = ""  # the setting that named the class, for the error messages
    if etl is None:
        etl = _etl_from_settings(Settings.from_env(require_target=False))
        setting = "ETL_CLASS" if isinstance(etl, str) else "ETL_CLASS_PAYLOAD"
    spec = etl
    if isinstance(etl, str):
        try:
            etl = import_string(etl.strip())
        except ImportStringError as exc:
            named = f" ({setting})" if setting else ""
            raise ConfigError(f"Cannot import ETL class {spec!r}{named}: {exc.exception}") from exc
    if isinstance(etl, type) and issubclass(etl, ETLServer):
        return etl()
    if isinstance(etl, ETLServer):
        return etl
    message = f"{etl!r} is not an ETLServer subclass or instance"
    if setting:  # a bad setting, reported as one (one line at start-up)
        raise ConfigError(f"{setting}={spec!r}: {message}")
    raise TypeError(message)


def _etl_from_settings(settings: Settings) -> str | type[ETLServer]:
    """``ETL_CLASS`` (an import string) or the class in ``ETL_CLASS_PAYLOAD`` (§8.3); not both
    (:meth:`Settings.from_env` refuses that)."""
    if settings.etl_class_payload:
        from etl_wsgi.payload import load_class

        return load_class(settings.etl_class_payload)
    if not settings.etl_class:
        raise ConfigError(
            "No ETL class given: call create_app(MyETL) / create_app('pkg.mod:MyETL') "
            "or set ETL_CLASS=pkg.mod:MyETL (or ETL_CLASS_PAYLOAD, see README)"
        )
    return settings.etl_class


def create_app(etl: Any = None) -> Flask:
    """A Flask app serving one ETL at the root (``/health``, ``GET|PUT /<path>``).

    Object requests take the direct WSGI path of :mod:`etl_wsgi.fastpath`; the app's static
    routes (``/health``, ``/ws``, any route added to the app) stay Flask's.
    """
    from etl_wsgi.flask_server import FlaskServer

    try:
        server = resolve_etl(etl)
    except ConfigError as exc:  # a gunicorn worker: one line for the server, not a traceback
        raise app_load_error(exc) from exc
    if isinstance(server, FlaskServer):
        return server.app
    app = Flask("etl_wsgi", static_folder=None)  # "/static/<path>" would shadow objects
    ETLExtension(app, server)
    app.wsgi_app = ObjectRoutes(server, app, "etl_wsgi.")  # type: ignore[method-assign]
    return app
