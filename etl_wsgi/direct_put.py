"""Outbound side: the session, the one retry loop of direct put, and its result (PROTOCOL.md §4).

Why an explicit urllib3 policy: a ``requests`` adapter built with no policy retries PUTs three
times on its own (PROTOCOL.md §9.2 #5), before any backoff, and could re-send a half-consumed
streaming body.  Here urllib3 never retries (``Retry(total=0)``), nor does the session's plain
path (:mod:`etl_wsgi.transport`); :func:`deliver` is the only loop, and it knows whether the
input can be produced again.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Union

import requests
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import LocationParseError, MaxRetryError, NewConnectionError
from urllib3.util.retry import Retry

from etl_wsgi import metrics
from etl_wsgi.config import Settings
from etl_wsgi.const import (
    HEADER_AUTHORIZATION,
    HEADER_DIRECT_PUT_LENGTH,
    HEADER_NODE_URL,
    RETRY_BACKOFF_BASE,
    RETRY_BACKOFF_MAX,
)
from etl_wsgi.errors import (
    DirectPutError,
    DirectPutRefusedError,
    ETLDirectPutTransientError,
    ETLError,
    InvalidPipelineError,
    OutboundTLSError,
)
from etl_wsgi.metrics import Recorder
from etl_wsgi.transport import SessionAdapter

log = logging.getLogger(__name__)

#: Transient ``requests`` errors a sync server retries (PROTOCOL.md §8.1): the connection was lost
#: before a complete response. Refused connections are split off by :func:`_is_connection_refused`.
SYNC_DIRECT_PUT_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
)

#: Also retried here (the SDK answers 500): a next hop that stalls past the read timeout.
_RETRIED_ERRORS: tuple[type[Exception], ...] = (*SYNC_DIRECT_PUT_TRANSIENT_ERRORS, requests.Timeout)

#: urllib3 never retries on its own: no hidden re-send of a PUT body (PROTOCOL.md §9.2 #5).
NO_HIDDEN_RETRIES = Retry(total=0, redirect=False, raise_on_status=False)


def build_session(settings: Settings) -> requests.Session:
    """The worker's outbound session: TLS and token from settings, explicit retry policy, pooling.

    ``trust_env`` is off: proxy variables must not reroute intra-cluster traffic, and looking
    them up costs time on every request.
    """
    session = requests.Session()
    session.trust_env = False
    adapter = SessionAdapter(
        pool_connections=16,
        pool_maxsize=settings.outbound_pool_size,
        max_retries=NO_HIDDEN_RETRIES,
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if settings.skip_verify:
        session.verify = False
    elif settings.client_ca:
        session.verify = settings.client_ca
    if settings.client_crt and settings.client_crt_key:
        session.cert = (settings.client_crt, settings.client_crt_key)
    if settings.authn_token:
        session.headers[HEADER_AUTHORIZATION] = f"Bearer {settings.authn_token}"
    return session


def _customised(session: requests.Session) -> bool:
    """A session someone gave auth, params, proxies, hooks, cookies or ``trust_env`` (a
    subclass customising ``self.session``): only ``Session.request`` applies those."""
    return bool(
        session.auth is not None
        or session.trust_env
        or session.params
        or session.proxies
        or any(session.hooks.values())
        or session.cookies
    )


def _send(
    session: requests.Session, req: requests.PreparedRequest, timeout: Any, stream: bool
) -> requests.Response:
    """``req`` through the session's mounted adapter (its pool), with its TLS settings.

    ``stream``: the caller reads the reply through ``resp.raw`` only (the hpull GET), so our
    adapter sends it over its :mod:`http.client` pool (:meth:`SessionAdapter.get_raw`).
    """
    assert req.url is not None
    verify = True if session.verify is None else session.verify
    adapter = session.get_adapter(req.url)
    if stream and isinstance(adapter, SessionAdapter):
        return adapter.get_raw(req, timeout=timeout, verify=verify, cert=session.cert)
    resp = adapter.send(
        req, stream=stream, timeout=timeout, verify=verify, cert=session.cert, proxies={}
    )
    if not stream:
        resp.content  # noqa: B018 - read it all: the connection goes back to the pool
    return resp


def stream_get(
    session: requests.Session, url: str, timeout: tuple[float, float]
) -> requests.Response:
    """``session.get(url, stream=True, timeout=timeout, allow_redirects=False)``, for the hpull
    GET back to the target (PROTOCOL.md §2.6), without the session's per-request merging.

    ``Session.request`` merges the session's params, cookies, auth, hooks and environment
    into every request, each through generic (on Python 3.11, Protocol ``isinstance``)
    checks: a third of a worker's CPU at 1 KiB hpull (py-spy).  ``url`` is ours, built from
    the validated ``AIS_TARGET_URL`` and a fully quoted path, so it is not re-parsed either:
    the request goes straight to the session's adapter with the session's headers (the
    token).  wrk 1 KiB hpull: 5.2-5.4k req/s against 3.7-4.1k.  A customised session goes
    through ``session.get``.  Unlike ``session.get``, cookies a target sets are not kept.

    The caller reads the reply through ``resp.raw`` only (:class:`etl_wsgi.sources.ResponseReader`),
    so our adapter sends a plain-HTTP GET over its :mod:`http.client` pool (:func:`_send`);
    another adapter mounted on the session gets it as ``session.get`` would send it.
    """
    if _customised(session):
        return session.get(url, stream=True, timeout=timeout, allow_redirects=False)
    req = requests.PreparedRequest()
    req.method = "GET"
    req.url = url
    req.headers = CaseInsensitiveDict(session.headers)  # type: ignore[arg-type]
    return _send(session, req, timeout, stream=True)


def put(
    session: requests.Session, url: str, data: Any, headers: dict[str, str], timeout: Any
) -> requests.Response:
    """``session.put(url, data=data, headers=headers, timeout=timeout, allow_redirects=False)``
    without the session's per-request merging (see :func:`stream_get`).

    ``url`` comes from ``Ais-Node-Url``, so it is prepared as ``session.put`` prepares it
    (validated, re-quoted, ``user:password@`` as basic auth) with the session's headers
    merged in.  The reply is read whole, as ``session.put`` does.
    """
    if _customised(session):
        return session.put(url, data=data, headers=headers, timeout=timeout, allow_redirects=False)
    merged = CaseInsensitiveDict(session.headers)
    merged.update(headers)
    # PreparedRequest.prepare() without its cookie and hook steps (the session has neither):
    # half of its cost, the empty cookie jar's header lookup mostly.
    req = requests.PreparedRequest()
    req.prepare_method("PUT")
    req.prepare_url(url, None)
    req.prepare_headers(merged)
    req.prepare_body(data, None)
    req.prepare_auth(None, url)  # user:password@ in the URL, as session.put
    return _send(session, req, timeout, stream=False)


def tls_error(exc: BaseException, peer: str) -> OutboundTLSError | None:
    """An :class:`OutboundTLSError` for a ``requests`` TLS failure, else ``None``.

    Every ``requests.exceptions.SSLError`` counts, not only certificate verification: a server
    that wants a client certificate we did not present may just drop the connection after the
    handshake (``SSLEOFError`` with TLS 1.3).  Such failures are configuration, not transient:
    never retried (PROTOCOL.md §4.4), answered ``502`` at once with the settings to check.
    The message has the innermost ``ssl`` reason, never a request header (the token).
    """
    if not isinstance(exc, requests.exceptions.SSLError):
        return None
    reason: BaseException = exc
    seen: set[int] = set()
    cursor: BaseException | None = exc
    while cursor is not None and id(cursor) not in seen:
        seen.add(id(cursor))
        if isinstance(cursor, ssl.SSLError):
            reason = cursor
        inner = cursor.args[0] if cursor.args else None
        cursor = cursor.__cause__ or (inner if isinstance(inner, BaseException) else None)
    return OutboundTLSError(
        f"TLS with {peer!r} failed: {type(reason).__name__}: {reason}. Check AIS_CLIENT_CA "
        "(CA of the target's certificate), AIS_CRT/AIS_CRT_KEY (client certificate for mTLS) "
        "or AIS_SKIP_VERIFY_CRT."
    )


def _is_connection_refused(exc: BaseException) -> bool:
    """True iff ``exc`` is ``ConnectionError(MaxRetryError(NewConnectionError))`` caused by refusal.

    urllib3 1.x sets only ``__context__`` on the ``NewConnectionError``; 2.x sets ``__cause__``;
    both are checked (PROTOCOL.md §9.2 #1).
    """
    inner = exc.args[0] if exc.args else None
    if not isinstance(inner, MaxRetryError):
        return False
    reason = inner.reason
    if not isinstance(reason, NewConnectionError):
        return False
    cause = reason.__cause__ or reason.__context__
    return isinstance(cause, ConnectionRefusedError)


def _handle_direct_put_transient_error(
    direct_put_url: str, exc: Exception, logger: logging.Logger
) -> tuple[int, bytes, int]:
    """SDK-compatible classification of a transient error (PROTOCOL.md §8.1, §4.4).

    Refused -> ``(502, message, 0)`` (permanent: nobody listens there);
    anything else -> raises :class:`ETLDirectPutTransientError` for the retry loop.
    """
    if isinstance(exc, requests.ConnectionError) and _is_connection_refused(exc):
        error = f"direct_put to {direct_put_url!r} failed: {type(exc).__name__}: {exc}"
        logger.error("Permanent connection error to %s: %s", direct_put_url, exc)
        return HTTPStatus.BAD_GATEWAY, error.encode(), 0
    raise ETLDirectPutTransientError(direct_put_url, exc) from exc


class CountingIterator:
    """Iterates ``inner`` and counts the bytes it yielded in ``bytes_sent`` (PROTOCOL.md §4.3, §5).

    Used as a chunked PUT body: the count is the ``Ais-Direct-Put-Length`` of a streamed object.
    """

    def __init__(self, inner: Iterable[bytes]) -> None:
        self._inner = inner
        self.bytes_sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self.bytes_sent += len(chunk)
            yield chunk


@dataclass(frozen=True)
class DirectPutResult:
    """What the next hop said, already mapped to our answer to the caller (PROTOCOL.md §4.3)."""

    status: int
    body: bytes = b""
    delivered: int = 0
    content_type: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        """``Ais-Direct-Put-Length`` on a delivered (204) result, omitted when 0."""
        if self.status == HTTPStatus.NO_CONTENT and self.delivered:
            return {HEADER_DIRECT_PUT_LENGTH: str(self.delivered)}
        return {}


def interpret_response(resp: requests.Response, sent: int) -> DirectPutResult:
    """Map the next hop's reply (PROTOCOL.md §4.3).

    204 -> delivered downstream, length from its header; 200 with a body -> the last stage's
    output, travels back; 200 empty -> the destination target stored ``sent`` bytes; anything
    else -> passed through with the body verbatim.  (The known wart: an empty transform result
    from a last stage looks like "delivered".)
    """
    content_type = resp.headers.get("Content-Type")
    if resp.status_code == HTTPStatus.NO_CONTENT:
        return DirectPutResult(HTTPStatus.NO_CONTENT, delivered=_int_header(resp))
    content = resp.content
    if resp.status_code == HTTPStatus.OK:
        if content:
            return DirectPutResult(HTTPStatus.OK, content, content_type=content_type)
        return DirectPutResult(HTTPStatus.NO_CONTENT, delivered=sent)
    return DirectPutResult(resp.status_code, content, content_type=content_type)


def _int_header(resp: requests.Response) -> int:
    try:
        return max(0, int(resp.headers.get(HEADER_DIRECT_PUT_LENGTH, "0")))
    except ValueError:
        return 0


Body = Union[bytes, CountingIterator]  # noqa: UP007 - runtime alias, Python 3.10


@dataclass
class Attempt:
    """The body of one attempt, and what to close once it is over (readers, generators)."""

    body: Body
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.body) if isinstance(self.body, bytes) else self.body.bytes_sent

    def close(self) -> None:
        for closer in self.closers:
            try:
                closer()
            except Exception:  # a failing close must not hide the put's outcome
                log.warning("closing direct-put input failed", exc_info=True)


#: ``send(url, body, headers)``: ``ETLServer.client_put``.
Send = Callable[..., requests.Response]


def deliver(
    send: Send,
    url: str,
    hop: str,
    remaining: str,
    make_attempt: Callable[[], Attempt],
    *,
    retries: int,
    replayable: bool,
    logger: logging.Logger = log,
    sleep: Callable[[float], None] = time.sleep,
    recorder: Recorder = metrics.NULL,
    obj_path: str = "",
) -> DirectPutResult:
    """The one direct-put retry loop (PROTOCOL.md §4.4).

    ``make_attempt`` produces the body afresh for every attempt (bytes in memory, or a re-opened
    source through a new ``transform_stream``).  Transient failures are retried ``retries`` times
    with backoff ``min(2**n, 30)`` s when the input is ``replayable``; a one-shot input gets no
    local retry and bails with ``503`` + retry reason so the target replays the PUT; exhaustion
    answers ``502``; a refused connection answers ``502`` at once.  Error texts name ``hop``
    (never ``url``, which holds the per-ETL secret).  The outcome and every retry are counted in
    ``recorder`` (:mod:`etl_wsgi.metrics`).
    """
    headers = {HEADER_NODE_URL: remaining} if remaining else {}
    budget = retries if replayable else 0
    try:
        for attempt_no in range(budget + 1):
            attempt = make_attempt()
            try:
                result = _send_once(send, url, hop, headers, attempt)
                recorder.direct_put(_OUTCOMES.get(result.status, "rejected"), result.delivered)
                return result
            except ETLDirectPutTransientError as exc:
                if attempt_no >= budget:
                    exc.bail_without_local_retry = not replayable
                    raise
                delay = min(RETRY_BACKOFF_BASE**attempt_no, RETRY_BACKOFF_MAX)
                logger.warning(
                    "%r: direct put to %s: attempt %d/%d failed, retrying in %.1fs: %s",
                    obj_path,
                    hop,
                    attempt_no + 1,
                    budget + 1,
                    delay,
                    exc.cause,
                    extra={"path": obj_path, "cause": str(exc.cause)},
                )
                recorder.direct_put_retry()
            finally:
                attempt.close()
            sleep(delay)
    except BaseException as exc:
        recorder.direct_put(_failure_outcome(exc))
        raise
    raise AssertionError("unreachable: the loop returns or raises")


#: Outcome label of a next hop's answer (anything else: ``rejected``).
_OUTCOMES: dict[int, str] = {HTTPStatus.NO_CONTENT: "delivered", HTTPStatus.OK: "returned"}


def _failure_outcome(exc: BaseException) -> str:
    if isinstance(exc, DirectPutRefusedError):
        return "refused"
    if isinstance(exc, ETLDirectPutTransientError):
        return "bailed" if exc.bail_without_local_retry else "exhausted"
    return "failed"


def _send_once(
    send: Send, url: str, hop: str, headers: Mapping[str, str], attempt: Attempt
) -> DirectPutResult:
    try:
        resp = send(url, attempt.body, headers)
        try:
            return interpret_response(resp, attempt.sent)
        finally:
            resp.close()
    except ETLError:
        raise  # the transform failed while producing the body, or a nested typed error
    except (requests.exceptions.InvalidURL, LocationParseError) as exc:
        # the hop came from the caller's Ais-Node-Url: its fault, not ours (400, not 500)
        raise InvalidPipelineError(f"Pipeline entry {hop!r} is not usable: {exc}") from exc
    except _RETRIED_ERRORS as exc:
        tls = tls_error(exc, hop)
        if tls is not None:
            raise tls from exc
        if isinstance(exc, requests.ConnectionError) and _is_connection_refused(exc):
            raise DirectPutRefusedError(
                f"direct_put to {hop!r} failed: {type(exc).__name__}: connection refused"
            ) from exc
        raise ETLDirectPutTransientError(hop, exc) from exc
    except Exception as exc:
        raise DirectPutError(f"direct_put to {hop!r} failed: {type(exc).__name__}: {exc}") from exc
