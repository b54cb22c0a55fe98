"""Flask extension: mount an ETL inside an existing Flask app.

    ext = ETLExtension(app, etl=MyETL)                       # at the root
    ext = ETLExtension(); ext.init_app(app, etl="pkg.mod:MyETL", url_prefix="/etl")

The host app's own routes keep working (Werkzeug prefers static routes to the ETL's catch-all
``/<path>``); several ETLs under several prefixes can share one app.  Registered ETLs are in
``app.extensions["etl_wsgi"]``, keyed by prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from etl_wsgi.blueprint import blueprint_name, make_blueprint

if TYPE_CHECKING:
    from flask import Flask

    from etl_wsgi.base_etl_server import ETLServer


class ETLExtension:
    """Serve an ETL (``ETLServer`` subclass, instance, or ``"pkg.mod:Class"``) in a Flask app.

    Without ``etl``, the app's ``ETL_CLASS`` config key is used, then the ``ETL_CLASS`` setting.
    """

    def __init__(
        self, app: Flask | None = None, etl: Any = None, url_prefix: str | None = None
    ) -> None:
        self.etl_spec = etl
        self.url_prefix = url_prefix
        self.etl: ETLServer | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, etl: Any = None, url_prefix: str | None = None) -> ETLServer:
        from etl_wsgi.app import resolve_etl

        prefix = url_prefix if url_prefix is not None else self.url_prefix
        spec = etl if etl is not None else self.etl_spec
        if spec is None:
            spec = app.config.get("ETL_CLASS")
        server = resolve_etl(spec)
        app.register_blueprint(make_blueprint(server, blueprint_name(prefix)), url_prefix=prefix)
        app.extensions.setdefault("etl_wsgi", {})[prefix or "/"] = server
        self.etl = server
        return server
