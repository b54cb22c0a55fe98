"""gunicorn as a programmatic application: what ``etl-wsgi serve`` runs.

:class:`ETLApplication` loads its configuration from :mod:`etl_wsgi.gunicorn_conf`, the module
``gunicorn -c gunicorn.conf.py`` reads, the way gunicorn loads any config file (every module
attribute that names a gunicorn setting), so both entry points run with the same settings, gevent
workers and hooks.  The ETL class is imported in each worker (:meth:`load`, no ``preload_app``),
after gevent patched the standard library, and never in the master.
"""

from __future__ import annotations

import importlib
from typing import Any

from gunicorn.app.base import BaseApplication


class ETLApplication(BaseApplication):
    """``gunicorn -c python:etl_wsgi.gunicorn_conf 'etl_wsgi.app:create_app("<etl_class>")'``."""

    def __init__(self, etl_class: str) -> None:
        self.etl_class = etl_class
        super().__init__(usage=None, prog="etl-wsgi serve")

    def load_config(self) -> None:
        # Imported here, once: its settings come from the environment at this point.
        conf = importlib.import_module("etl_wsgi.gunicorn_conf")
        for key, value in vars(conf).items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        from etl_wsgi.app import create_app

        return create_app(self.etl_class)
