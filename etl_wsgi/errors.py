"""Exceptions that carry their HTTP answer.

Every failure the request flow can report is one of these classes; each carries its status, extra
headers and message, so the adapters (Flask blueprint, later WebSocket) map them to the wire in one
place (:func:`etl_wsgi.blueprint.error_response`).  The table is PROTOCOL.md §7.

Pure module: imports neither Flask nor requests.
"""

from __future__ import annotations

import errno
from http import HTTPStatus

from etl_wsgi.const import ETL_RETRY_REASON_DIRECT_PUT_TRANSIENT, HEADER_ETL_RETRY_REASON


class ETLError(Exception):
    """Base of all errors answered to the caller. ``status``/``headers`` say how."""

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR
    #: Set once the failure was logged (:func:`etl_wsgi.handler.log_error`): log it only once.
    logged: bool = False

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        """Text of the JSON ``{"error": ...}`` body."""
        return str(self)

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers."""
        return {}


def as_etl_error(exc: BaseException) -> ETLError:
    """``exc`` itself if typed, else a 500 naming it, ``exc`` as its cause (logged with trace)."""
    if isinstance(exc, ETLError):
        return exc
    wrapped = ETLError(f"{type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


class InvalidPipelineError(ETLError, ValueError):
    """Malformed ``Ais-Node-Url`` header -> 400 (PROTOCOL.md §4.1, §7)."""

    status = HTTPStatus.BAD_REQUEST

    @property
    def message(self) -> str:
        return f"Invalid pipeline header: {self}"


class BadRequestError(ETLError):
    """Request the server cannot act on (malformed parameter) -> 400."""

    status = HTTPStatus.BAD_REQUEST


class IncompleteBodyError(BadRequestError):
    """The request body ended before its ``Content-Length`` (client gone mid-upload) -> 400.

    gunicorn hands the application a short body at EOF without an error; without this check a
    truncated object would be transformed and delivered as if it were whole.
    """

    def __init__(self, received: int, expected: int) -> None:
        super().__init__(
            f"Request body ended after {received} of {expected} bytes (Content-Length)"
        )


class ObjectNotFoundError(ETLError):
    """``etl_fqn`` names no readable file -> 404 (PROTOCOL.md §3, §7)."""

    status = HTTPStatus.NOT_FOUND

    def __init__(self, obj_path: str, fs_path: str) -> None:
        super().__init__(f"Error processing object {obj_path!r}: file not found at {fs_path!r}.")


class FileAccessError(ETLError):
    """``etl_fqn`` exists but cannot be read (permissions) -> 403."""

    status = HTTPStatus.FORBIDDEN


class FqnNotAllowedError(ETLError):
    """``etl_fqn`` resolves outside every ``ETL_FQN_ROOTS`` directory -> 403 (PROTOCOL.md §3)."""

    status = HTTPStatus.FORBIDDEN


class DestinationNotAllowedError(ETLError):
    """An ``Ais-Node-Url`` hop names a host outside ``ETL_ALLOWED_DESTINATIONS`` -> 403 (§4.1)."""

    status = HTTPStatus.FORBIDDEN


class OutboundTLSError(ETLError):
    """TLS with the target or next hop failed (certificate not trusted, client certificate
    refused): a configuration problem, not transient, never retried -> 502 (PROTOCOL.md §4.4).

    Not 500: the failure is the far side's identity, like a refused connection (also 502).
    """

    status = HTTPStatus.BAD_GATEWAY


class UpstreamStatusError(ETLError):
    """The target answered our GET with a non-2xx status: forward that status (PROTOCOL.md §2.6)."""

    def __init__(self, status: int) -> None:
        super().__init__("Target request failed", status=status)


class UpstreamNetworkError(ETLError):
    """The GET to the target failed on the network -> 502 (PROTOCOL.md §2.6, §7)."""

    status = HTTPStatus.BAD_GATEWAY


class TransformError(ETLError):
    """The user's transform raised -> 500 with the exception text (PROTOCOL.md §7)."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


#: What user code may raise and the request flow answers with a 500.  Beyond ``Exception``:
#: ``sys.exit()`` (``argparse`` calls it on bad ``etl_args``) and ``KeyboardInterrupt``.  Let
#: through, either ends the gevent worker and every request on it, and exit codes 3 and 4 make
#: gunicorn's master halt the whole server (PROTOCOL.md §1.1: the server process must never
#: exit; §9.2 #14).  ``GreenletExit`` and gevent's ``Timeout`` are not here: they cancel requests.
USER_CODE_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit, KeyboardInterrupt)


def transform_error(exc: BaseException) -> TransformError:
    """The 500 for a failure of the user's transform, with its text (``SystemExit: 3``)."""
    text = str(exc)
    if not isinstance(exc, Exception):
        text = f"{type(exc).__name__}: {text}" if text else ""
    error = TransformError(text or type(exc).__name__)
    error.__cause__ = exc
    return error


class DirectPutRefusedError(ETLError):
    """The next hop refused the connection: permanent, not retried -> 502 (PROTOCOL.md §4.4)."""

    status = HTTPStatus.BAD_GATEWAY


class DirectPutError(ETLError):
    """A non-transient failure while sending to the next hop -> 500 (PROTOCOL.md §4.3)."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


class ETLDirectPutTransientError(ETLError):
    """A direct put failed with a transient network error (PROTOCOL.md §4.4).

    Raised by one attempt; the retry loop retries it while the source is replayable.  When it
    escapes to the caller: ``bail_without_local_retry`` (one-shot streaming body, no local retry
    possible) -> ``503`` + ``Ais-Etl-Retry-Reason: direct-put-transient`` so the target replays the
    whole PUT; otherwise (local retries exhausted) -> ``502``.
    """

    def __init__(
        self, url: str, cause: BaseException, bail_without_local_retry: bool = False
    ) -> None:
        self.url = url
        self.cause = cause
        self.bail_without_local_retry = bail_without_local_retry
        super().__init__(
            f"direct_put to {url!r} failed with transient error: {type(cause).__name__}({cause})"
        )

    @property
    def status(self) -> int:  # type: ignore[override]
        if self.bail_without_local_retry:
            return HTTPStatus.SERVICE_UNAVAILABLE
        return HTTPStatus.BAD_GATEWAY

    @property
    def message(self) -> str:
        if self.bail_without_local_retry:
            return f"Direct put bailed (one-shot body): {self}"
        return f"Direct put failed after retries: {self}"

    @property
    def headers(self) -> dict[str, str]:
        if self.bail_without_local_retry:
            return {HEADER_ETL_RETRY_REASON: ETL_RETRY_REASON_DIRECT_PUT_TRANSIENT}
        return {}


class StreamCut(ETLError, ConnectionResetError):
    """A streamed reply failed after its status line: the connection must be cut (PROTOCOL.md §5).

    Raised from the reply body with the logged :class:`ETLError` as its cause.  A
    ``ConnectionResetError`` (``ECONNRESET``) so WSGI servers abort the chunked body and close
    the connection quietly (gunicorn and Werkzeug treat it as a dropped client) instead of
    logging the same failure a second time with a traceback.
    """

    logged = True

    def __init__(self, cause: ETLError) -> None:
        super().__init__(cause.message, status=cause.status)
        self.errno = errno.ECONNRESET
