"""``FlaskServer``: drop-in for ``aistore.sdk.etl.webserver.flask_server.FlaskServer``.

An ais-etl transformer that subclasses aistore's ``FlaskServer`` ports by one import; its
``.app`` is served by gunicorn (``gunicorn -c gunicorn.conf.py 'mymod:server.app'``) with our
gevent workers and the full wire contract.
"""

from __future__ import annotations

from flask import Flask

from etl_wsgi.base_etl_server import ETLServer
from etl_wsgi.extension import ETLExtension


class FlaskServer(ETLServer):
    """An ``ETLServer`` with a Flask ``app``. Constructing it does not bind; ``start()`` does."""

    def __init__(self, host: str = "0.0.0.0", port: int = 8000) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.app = Flask("etl_wsgi")
        ETLExtension(self.app, self)

    def start(self) -> None:
        """Serve with Werkzeug's threaded development server (local development only)."""
        self.logger.info("Starting Flask ETL server at %s:%d", self.host, self.port)
        self.app.run(host=self.host, port=self.port, threaded=True)
