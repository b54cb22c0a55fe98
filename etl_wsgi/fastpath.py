"""``create_app``'s direct WSGI path for object requests: Flask's dispatch skipped, same flow.

Profiling hpush with 1 KiB objects showed Flask's per-request machinery (contexts, signals,
URL matching, error-handler lookup) costing more CPU than everything else in the worker put
together.  :class:`ObjectRoutes` sits in front of the Flask app that :func:`~etl_wsgi.app.
create_app` builds: ``GET|PUT /<path>`` (PROTOCOL.md §2.1) goes straight to
:func:`~etl_wsgi.blueprint.object_reply`, the flow the blueprint's view runs (same request
parsing, same :func:`~etl_wsgi.handler.handle`, same error table); everything else
(``/health``, ``/ws``, other methods, any route added to the app) is Flask's, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import IO, TYPE_CHECKING, Any

from werkzeug.datastructures import MultiDict
from werkzeug.sansio.utils import get_content_length
from werkzeug.wrappers import Request

from etl_wsgi.blueprint import object_reply, reply_response
from etl_wsgi.handler import Reply

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from flask import Flask

    from etl_wsgi.base_etl_server import ETLServer

#: Methods of the object routes (§2.1); any other goes to Flask (405 with ``Allow``, HEAD...).
OBJECT_METHODS = frozenset(("GET", "PUT"))


_OK = f"{HTTPStatus.OK.value} {HTTPStatus.OK.phrase}"


class _Releasing:
    """A one-item body whose ``close()`` (the WSGI server calls it) frees the memory budget."""

    __slots__ = ("body", "etl", "held")

    def __init__(self, body: bytes, etl: ETLServer, held: int) -> None:
        self.body = body
        self.etl = etl
        self.held = held

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        held, self.held = self.held, 0
        if held:
            self.etl.memory_budget.release(held)


class EnvironRequest:
    """What :func:`~etl_wsgi.blueprint.object_reply` reads of a request, off the WSGI environ.

    A Werkzeug ``Request`` (its construction, header view and twice-parsed ``Content-Length``)
    was 2-4 us of a 17 us request in-process; it is built here only for what this class does
    not answer itself: a query string's arguments, the body stream when gunicorn's socket
    cannot be read directly, the path of an error reply.  Same values as Werkzeug's.
    """

    __slots__ = ("_full", "environ")

    #: A bare Werkzeug ``Request`` sets no limit either (Flask's reads the app's config).
    max_content_length = None

    def __init__(self, environ: WSGIEnvironment) -> None:
        self.environ = environ
        self._full: Request | None = None

    @property
    def full(self) -> Request:
        if self._full is None:
            self._full = Request(self.environ)
        return self._full

    @property
    def method(self) -> str:
        return self.environ.get("REQUEST_METHOD", "GET").upper()  # type: ignore[no-any-return]

    @property
    def content_length(self) -> int | None:
        return get_content_length(
            self.environ.get("CONTENT_LENGTH"), self.environ.get("HTTP_TRANSFER_ENCODING")
        )

    @property
    def args(self) -> MultiDict[str, str]:
        return self.full.args

    @property
    def stream(self) -> IO[bytes]:
        return self.full.stream

    @property
    def path(self) -> str:
        return self.full.path


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
        request = EnvironRequest(environ)
        # PEP 3333 carries the decoded path as latin-1; object names are UTF-8 (§2.5).  Only
        # the one leading "/" goes: an object name may itself start with "/" (Werkzeug's
        # ``request.path`` would strip them all).
        path = path_info.encode("latin-1").decode("utf-8", "replace")[1:]
        reply = object_reply(self.etl, request, path)
        if not isinstance(reply, Reply):  # an error, already a response
            return reply(environ, start_response)
        if reply.status != HTTPStatus.OK or not isinstance(reply.body, bytes):
            return reply_response(self.etl, reply)(environ, start_response)
        return self._write_plain(reply, reply.body, start_response)

    def _write_plain(
        self, reply: Reply, body: bytes, start_response: StartResponse
    ) -> Iterable[bytes]:
        """A ``200`` with a bytes body, straight to WSGI: the same headers a Werkzeug response
        gets from :func:`~etl_wsgi.blueprint.to_response`, without building one (py-spy: the
        response object and its WSGI conversion were 8% of a worker at 1 KiB hpush)."""
        headers = list(reply.headers.items())
        if reply.content_type is not None:
            headers.append(("Content-Type", reply.content_type))
        headers.append(("Content-Length", str(len(body))))
        start_response(_OK, headers)
        if reply.held:
            return _Releasing(body, self.etl, reply.held)
        return (body,)

    def _learn_routes(self) -> None:
        rules = list(self.app.url_map.iter_rules())
        self._enabled = all(
            not rule.arguments or rule.endpoint.startswith(self.etl_endpoints) for rule in rules
        )
        self._reserved = frozenset(rule.rule for rule in rules if not rule.arguments)
