"""``create_app``'s direct WSGI path for object requests: Flask's dispatch skipped, same flow.

Profiling hpush with 1 KiB objects showed Flask's per-request machinery (contexts, signals,
URL matching, error-handler lookup) costing more CPU than everything else in the worker put
together.  :class:`ObjectRoutes` sits in front of the Flask app that :func:`~etl_wsgi.app.
create_app` builds: ``GET|PUT /<path>`` (PROTOCOL.md §2.1) goes straight to
:func:`~etl_wsgi.blueprint.serve_object`, the same function the blueprint's view calls (same
request parsing, same :func:`~etl_wsgi.handler.handle`, same error table); everything else
(``/health``, ``/ws``, other methods, any route added to the app) is Flask's, as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from werkzeug.wrappers import Request

from etl_wsgi.blueprint import serve_object

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from flask import Flask

    from etl_wsgi.base_etl_server import ETLServer

#: Methods of the object routes (§2.1); any other goes to Flask (405 with ``Allow``, HEAD...).
OBJECT_METHODS = frozenset(("GET", "PUT"))


class ObjectRoutes:
    """WSGI middleware in front of ``app.wsgi_app``: object requests served directly.

    The app's static routes stay Flask's (``/health``, ``/ws``, ``/metrics``, a user's
    ``/version``...); if a route with a variable part other than the ETL's own was added, the
    direct path is off and Flask routes everything.  Decided on the first request, when the
    app's routes are final (Flask refuses new routes after it too).
    """

    def __init__(self, etl: ETLServer, app: Flask, etl_endpoints: str) -> None:
        self.etl = etl
        self.app = app
        self.wsgi_app = app.wsgi_app
        self.etl_endpoints = etl_endpoints
        self._reserved: frozenset[str] | None = None
        self._enabled = True

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[Any]:
        if self._reserved is None:
            self._learn_routes()
        path_info = environ.get("PATH_INFO") or "/"
        if (
            not self._enabled
            or environ["REQUEST_METHOD"] not in OBJECT_METHODS
            or path_info in self._reserved  # type: ignore[operator]
        ):
            return self.wsgi_app(environ, start_response)
        request = Request(environ)
        # PEP 3333 carries the decoded path as latin-1; object names are UTF-8 (§2.5).  Only
        # the one leading "/" goes: an object name may itself start with "/" (Werkzeug's
        # ``request.path`` would strip them all).
        path = path_info.encode("latin-1").decode("utf-8", "replace")[1:]
        return serve_object(self.etl, request, path)(environ, start_response)

    def _learn_routes(self) -> None:
        rules = list(self.app.url_map.iter_rules())
        self._enabled = all(
            not rule.arguments or rule.endpoint.startswith(self.etl_endpoints) for rule in rules
        )
        self._reserved = frozenset(rule.rule for rule in rules if not rule.arguments)
