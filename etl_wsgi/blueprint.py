"""Flask adapter: ``flask.request`` -> ``ParsedRequest`` -> ``handle()`` -> ``flask.Response``.

Routes (PROTOCOL.md §2.1): ``GET /health``, ``GET|PUT /<path>``, ``GET /ws`` (§6), and
``GET /metrics`` (Prometheus; the metrics themselves are recorded by :mod:`etl_wsgi.handler`).
Errors are mapped to the wire in :func:`error_response`, the one table of PROTOCOL.md §7 (JSON
``{"error": "..."}`` bodies).
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

from flask import Blueprint, Response, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response as WerkzeugResponse

from etl_wsgi import handler
from etl_wsgi.const import HEADER_NODE_URL, QPARAM_ETL_ARGS, QPARAM_ETL_FQN
from etl_wsgi.errors import USER_CODE_FAILURES, ETLError, as_etl_error
from etl_wsgi.handler import Reply, handle, http_source
from etl_wsgi.protocol import ParsedRequest
from etl_wsgi.socket_body import socket_body
from etl_wsgi.ws import is_upgrade, serve_websocket

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

    from etl_wsgi.base_etl_server import ETLServer


class RequestView(Protocol):
    """What the object flow reads of a request: a Werkzeug (or Flask) ``Request`` has it all;
    :class:`~etl_wsgi.fastpath.EnvironRequest` reads most of it off the WSGI environ."""

    @property
    def environ(self) -> WSGIEnvironment: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def args(self) -> MultiDict[str, str]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def max_content_length(self) -> int | None: ...
    @property
    def stream(self) -> IO[bytes]: ...


def make_blueprint(etl: ETLServer, name: str = "etl_wsgi") -> Blueprint:
    """A blueprint serving ``etl``: health, and transform on every other path."""
    bp = Blueprint(name, __name__)

    def health() -> Response:
        return to_response(handler.health(etl))

    def transform(path: str = "") -> WerkzeugResponse:
        return serve_object(etl, request, path)

    def websocket() -> WerkzeugResponse:
        """``/ws`` (PROTOCOL.md §6); a plain GET of an object named ``ws`` is still hpull."""
        if not is_upgrade(request.environ):
            return transform("ws")
        serve_websocket(etl, request.environ)
        return _SocketTakenOver()

    def on_error(exc: Exception) -> Response | HTTPException:
        if isinstance(exc, HTTPException):  # routing, 405, 413...: Werkzeug's own answer
            return exc
        return exception_response(etl, request, exc)

    # merge_slashes=False: object names may contain "//"; Werkzeug would otherwise redirect.
    bp.add_url_rule("/health", "health", health, methods=["GET"])
    bp.add_url_rule("/metrics", "metrics", lambda: metrics_response(etl), methods=["GET"])
    bp.add_url_rule("/ws", "websocket", websocket, methods=["GET"], websocket=True)
    bp.add_url_rule("/", "transform_root", transform, methods=["GET", "PUT"], merge_slashes=False)
    bp.add_url_rule(
        "/<path:path>", "transform", transform, methods=["GET", "PUT"], merge_slashes=False
    )
    bp.register_error_handler(Exception, on_error)
    return bp


def serve_object(etl: ETLServer, request: Request, path: str) -> WerkzeugResponse:
    """``GET|PUT /<path>``: one object through :func:`handle`, errors mapped (§2, §7).

    The blueprint's view; :class:`~etl_wsgi.fastpath.ObjectRoutes` (``create_app``'s direct
    WSGI path) calls :func:`object_reply` itself and writes plain replies without a Response.
    """
    reply = object_reply(etl, request, path)
    if isinstance(reply, WerkzeugResponse):
        return reply
    return reply_response(etl, reply)


def object_reply(etl: ETLServer, request: RequestView, path: str) -> Reply | WerkzeugResponse:
    """The one request flow of both adapters: the :class:`Reply`, or the error's response.

    Query and header are looked up without ``.get()``: Werkzeug's ``MultiDict.get`` and
    ``EnvironHeaders.get`` build a ``BadRequestKeyError`` for every absent key (py-spy: 2% of
    a worker at 1 KiB hpush).
    """
    try:
        # no query string (hpush without etl_fqn): no MultiDict built (py-spy: 5% of a worker)
        query = request.args if request.environ.get("QUERY_STRING") else None
        req = ParsedRequest(
            method=request.method,
            path=path,
            etl_args=_first(query, QPARAM_ETL_ARGS),
            fqn=_first(query, QPARAM_ETL_FQN),
            node_url=request.environ.get(ENVIRON_NODE_URL, ""),
        )
        source = http_source(etl, req, request_body(request), request.content_length)
        return handle(etl, req, source)
    except HTTPException as exc:  # e.g. ClientDisconnected while reading the body: a 400
        return exc.get_response(request.environ)
    except USER_CODE_FAILURES as exc:  # also a user hook's sys.exit(): the worker must live on
        return exception_response(etl, request, exc)


#: WSGI's environ key of the ``Ais-Node-Url`` header (PEP 3333: ``HTTP_`` + upper, ``-``->``_``).
ENVIRON_NODE_URL = "HTTP_" + HEADER_NODE_URL.upper().replace("-", "_")


def _first(query: MultiDict[str, str] | None, name: str) -> str:
    values = query.getlist(name) if query is not None else ()
    return values[0].strip() if values else ""


def reply_response(etl: ETLServer, reply: Reply) -> Response:
    """A successful :class:`Reply` as a Flask response; its memory budget freed on close."""
    response = to_response(reply)
    if reply.held:
        response.call_on_close(lambda: etl.memory_budget.release(reply.held))
    return response


def request_body(request: RequestView) -> IO[bytes]:
    """The body to read: off gunicorn's socket when it can be (:mod:`etl_wsgi.socket_body`).

    ``request.stream`` otherwise, and also when the app sets ``MAX_CONTENT_LENGTH`` and the
    body is larger: Werkzeug's stream then answers ``413`` as the app asked.
    """
    limit = request.max_content_length
    if limit is None or (request.content_length or 0) <= limit:
        raw = socket_body(request.environ)
        if raw is not None:
            return cast("IO[bytes]", raw)  # read() as IO's; BodySource also uses readinto()
    return request.stream


def metrics_response(etl: ETLServer) -> Response:
    """Prometheus scrape (every worker's values); 404 with ``ETL_METRICS`` off."""
    reply = handler.metrics_reply(etl)
    if reply is None:  # not logged: a scraper would fill the log
        body = json.dumps({"error": "metrics are disabled (ETL_METRICS)"}).encode()
        return Response(body, status=HTTPStatus.NOT_FOUND, content_type="application/json")
    return to_response(reply)


def to_response(reply: Reply) -> Response:
    """A :class:`Reply` as a Flask response; an iterable body streams (chunked, §2.7).

    No ``content_type`` (a direct put's ``204``, §4.3), no ``Content-Type``: not Flask's
    default ``text/html``.
    """
    response = Response(
        reply.body,
        status=reply.status,
        headers=dict(reply.headers),
        content_type=reply.content_type,
        direct_passthrough=not isinstance(reply.body, bytes),
    )
    if reply.content_type is None:
        del response.headers["Content-Type"]
    return response


class _SocketTakenOver(Response):
    """Returned after a WebSocket session: the socket is closed, no HTTP reply may follow.

    gunicorn's worker ends the connection on ``StopIteration``; Werkzeug's development server
    on ``ConnectionError`` (the approach of flask-sock).
    """

    def __call__(self, environ: Any, start_response: Any) -> Any:
        if "gunicorn.socket" in environ:
            raise StopIteration()
        raise ConnectionError("WebSocket session ended")


def exception_response(etl: ETLServer, request: RequestView, exc: BaseException) -> Response:
    """Any exception as its reply: typed errors as themselves, anything else as a logged 500."""
    error = as_etl_error(exc)
    return error_response(etl, request, error, exc_info=None if error is exc else exc)


def error_response(
    etl: ETLServer, request: RequestView, exc: ETLError, exc_info: BaseException | None = None
) -> Response:
    """The one mapping of errors to the wire (PROTOCOL.md §7), logged once with path and cause.

    The per-ETL secret of ``AIS_TARGET_URL`` is redacted: error bodies end up in AIS job errors.
    """
    message = handler.log_error(etl, request.method, request.path, exc, exc_info=exc_info)
    body = json.dumps({"error": message}).encode()
    return Response(body, status=exc.status, headers=exc.headers, content_type="application/json")


def blueprint_name(url_prefix: str | None) -> str:
    """A blueprint name unique per mount point, so two ETLs can live in one app."""
    if not url_prefix or url_prefix == "/":
        return "etl_wsgi"
    return "etl_wsgi_" + re.sub(r"\W", "_", url_prefix.strip("/"))
