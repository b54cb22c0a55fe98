"""etl-wsgi: your AIStore transformer class as a production ETL server.

Imports are lazy: ``import etl_wsgi`` loads neither Flask nor requests (nor ``ssl``), so the
gunicorn master stays unpatched-safe; the gevent worker patches the standard library after fork,
and everything heavy is imported there.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ETLServer": "etl_wsgi.base_etl_server",
    "CountingIterator": "etl_wsgi.base_etl_server",
    "FlaskServer": "etl_wsgi.flask_server",
    "ETLExtension": "etl_wsgi.extension",
    "create_app": "etl_wsgi.app",
    "ETLError": "etl_wsgi.errors",
    "ETLDirectPutTransientError": "etl_wsgi.errors",
    "InvalidPipelineError": "etl_wsgi.errors",
    "ConfigError": "etl_wsgi.config",
    "Settings": "etl_wsgi.config",
}

__all__ = [
    "ConfigError",
    "CountingIterator",
    "ETLDirectPutTransientError",
    "ETLError",
    "ETLExtension",
    "ETLServer",
    "FlaskServer",
    "InvalidPipelineError",
    "Settings",
    "create_app",
]

if TYPE_CHECKING:
    from etl_wsgi.app import create_app
    from etl_wsgi.base_etl_server import CountingIterator, ETLServer
    from etl_wsgi.config import ConfigError, Settings
    from etl_wsgi.errors import ETLDirectPutTransientError, ETLError, InvalidPipelineError
    from etl_wsgi.extension import ETLExtension
    from etl_wsgi.flask_server import FlaskServer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'etl_wsgi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
