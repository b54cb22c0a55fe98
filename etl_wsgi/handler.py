"""The request flow, framework-free: one path for buffered and streaming (PROTOCOL.md §2-§5).

An adapter (the Flask blueprint, later WebSocket) decodes its request into a
:class:`~etl_wsgi.protocol.ParsedRequest`, calls :func:`handle`, and writes the returned
:class:`Reply`.  Failures are raised as :class:`~etl_wsgi.errors.ETLError` subclasses; the adapter
maps them in one place and logs them once with :func:`log_error`.  Metrics are recorded here
(:mod:`etl_wsgi.metrics`), so every adapter gets them; :func:`health` and :func:`metrics_reply`
answer the two other routes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import IO, TYPE_CHECKING, Any

from etl_wsgi import metrics
from etl_wsgi.const import DEFAULT_MIME_TYPE, HEALTH_BODY
from etl_wsgi.direct_put import Attempt, CountingIterator, DirectPutResult, deliver
from etl_wsgi.errors import USER_CODE_FAILURES, ETLError, StreamCut, TransformError, transform_error
from etl_wsgi.metrics import ROUTE_HEALTH, ROUTE_OBJECT, STATUS_ABORTED, Recorder, Track
from etl_wsgi.protocol import (
    ParsedRequest,
    Pipeline,
    compose_direct_put_url,
    parse_pipeline,
    redact_secret,
)
from etl_wsgi.sources import FileSource, Source, select_source

if TYPE_CHECKING:
    from etl_wsgi.base_etl_server import ETLServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """What to answer: status, headers, and a body that is bytes or a closable chunk iterable."""

    status: int
    body: bytes | Iterable[bytes] = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None
    #: Memory-budget bytes the adapter releases once the reply is written.
    held: int = field(default=0, compare=False)


def http_source(
    etl: ETLServer, req: ParsedRequest, body: IO[bytes], content_length: int | None = None
) -> Source:
    """The input of an HTTP request: FQN file, upstream GET, or the body (§2-§3)."""
    return select_source(
        req,
        body,
        session=etl.session,
        host_target=etl.host_target,
        timeout=etl.settings.timeouts,
        content_length=content_length,
        fqn_roots=etl.settings.fqn_roots,
    )


def checked_pipeline(etl: ETLServer, req: ParsedRequest) -> Pipeline | None:
    """Parse ``Ais-Node-Url`` (400 if malformed) and check every hop against
    ``ETL_ALLOWED_DESTINATIONS`` (403): before any input is read (PROTOCOL.md §4.1)."""
    pipeline = parse_pipeline(req.node_url)
    if pipeline is not None:
        etl.settings.allowed_destinations.check(pipeline.hops, etl.host_target)
    return pipeline


def handle(etl: ETLServer, req: ParsedRequest, source: Source, route: str = ROUTE_OBJECT) -> Reply:
    """Transform one object and answer, or deliver it to the next hop (§4).

    Metrics (:mod:`etl_wsgi.metrics`) are recorded here, for every adapter: the request is
    counted when its reply is known, or, for a streamed body, when the body is closed.
    """
    recorder = metrics.recorder(etl.settings)
    track = recorder.start(req.method, route)
    try:
        reply = _handle(etl, req, source, recorder, track)
    except ETLError as exc:
        track.finish(exc.status)
        raise
    except BaseException:
        track.finish(HTTPStatus.INTERNAL_SERVER_ERROR)
        raise
    if isinstance(reply.body, bytes):  # else the streamed body's close() finishes the track
        track.finish(reply.status, len(reply.body))
    return reply


def health(etl: ETLServer) -> Reply:
    """``GET /health`` (PROTOCOL.md §1.1): the readiness probe, counted like any request."""
    metrics.recorder(etl.settings).request("GET", ROUTE_HEALTH, HTTPStatus.OK)
    return Reply(HTTPStatus.OK, HEALTH_BODY, content_type="text/plain")


def metrics_reply(etl: ETLServer) -> Reply | None:
    """``GET /metrics``: the Prometheus exposition; ``None`` (answer 404) with metrics off."""
    scraped = metrics.recorder(etl.settings).exposition()
    if scraped is None:
        return None
    body, content_type = scraped
    return Reply(HTTPStatus.OK, body, content_type=content_type)


def _handle(
    etl: ETLServer, req: ParsedRequest, source: Source, recorder: Recorder, track: Track
) -> Reply:
    pipeline = checked_pipeline(etl, req)
    if etl.use_streaming:
        if pipeline is None:
            return _stream_reply(etl, req, source, recorder, track)
        return _direct_put(
            etl,
            req,
            pipeline,
            lambda: _stream_attempt(etl, req, source, recorder, track),
            source,
            recorder,
        )

    budget = etl.memory_budget
    # Input and output of a buffered transform are both in memory: reserve twice the input.
    held = 0
    try:
        hint = source.start()
        held = budget.acquire(2 * (hint or 0))
        data_in = read_input(etl, source, hint)
        if hint is None:  # size known only now (chunked request body or upstream reply)
            held += budget.acquire(2 * len(data_in))
        size = len(data_in) if isinstance(data_in, bytes) else hint  # a path with ETL_DIRECT_FQN
        track.bytes_in = size or 0
        started = metrics.clock()
        try:
            data = etl.executor.run(_call_transform, etl, req, data_in, site="transform", size=size)
        finally:
            recorder.transform_time("buffered", metrics.clock() - started)
        if pipeline is None:
            return Reply(HTTPStatus.OK, data, content_type=etl.get_mime_type(), held=held)
        reply = _direct_put(etl, req, pipeline, lambda: Attempt(data), None, recorder)
        return dataclasses.replace(reply, held=held)
    except BaseException:
        budget.release(held)
        source.close()
        raise


def read_input(etl: ETLServer, source: Source, size: int | None = None) -> bytes | str:
    """The whole input, or the FQN path with ``ETL_DIRECT_FQN`` (the transform opens it).

    FQN reads go through ``etl.executor`` (off the event loop in ``thread`` mode; ``size``, the
    file's size, for ``auto``); socket inputs are read in the request's greenlet, which owns
    the socket.
    """
    if etl.direct_fqn and isinstance(source, FileSource):
        return source.check()
    if isinstance(source, FileSource):
        return etl.executor.run(source.read_all, site="fqn-read", size=size)
    return source.read_all()


def _call_transform(etl: ETLServer, req: ParsedRequest, data: bytes | str) -> bytes:
    try:
        out = etl.transform(data, req.path, req.etl_args)
    except ETLError:
        raise
    except USER_CODE_FAILURES as exc:
        raise transform_error(exc) from exc
    if isinstance(out, bytes):
        return out
    if isinstance(out, (bytearray, memoryview)):
        return bytes(out)
    raise TransformError(f"transform() returned {type(out).__name__}, expected bytes")


def _direct_put(
    etl: ETLServer,
    req: ParsedRequest,
    pipeline: Pipeline,
    make_attempt: Callable[[], Attempt],
    source: Source | None,
    recorder: Recorder,
) -> Reply:
    url = compose_direct_put_url(pipeline.first, etl.host_target, req.path, req.etl_args)
    result = deliver(
        etl.client_put,
        url,
        pipeline.first,
        pipeline.remaining,
        make_attempt,
        retries=etl.direct_put_retries,
        # buffered output is in memory: always replayable
        replayable=source is None or source.replayable,
        logger=etl.logger,
        recorder=recorder,
        obj_path=req.path,
    )
    return reply_from_result(result)


def reply_from_result(result: DirectPutResult) -> Reply:
    """The answer to our caller for the next hop's answer (PROTOCOL.md §4.3)."""
    content_type = result.content_type or DEFAULT_MIME_TYPE if result.body else None
    return Reply(result.status, result.body, result.headers, content_type)


def _stream_attempt(
    etl: ETLServer, req: ParsedRequest, source: Source, recorder: Recorder, track: Track
) -> Attempt:
    """Open the input afresh; ``transform_stream`` on it starts when the put asks for the first
    chunk (a failure then, even in the call itself, is the guard's ``TransformError``)."""
    reader = source.open()
    output = _guard_stream(lambda: etl.transform_stream(reader, req.path, req.etl_args), recorder)

    def count_input() -> None:  # the last attempt's input is the object's
        track.bytes_in = _bytes_read(reader, source)

    return Attempt(
        CountingIterator(output), [output.close, count_input, lambda: etl.close_reader(reader)]
    )


def _stream_reply(
    etl: ETLServer, req: ParsedRequest, source: Source, recorder: Recorder, track: Track
) -> Reply:
    """Plain streaming reply (PROTOCOL.md §5).

    The first chunk is produced *before* the reply is returned, so a transform that fails at once
    gets a proper 500 instead of a truncated 200.  The body is a :class:`ClosingBody`: WSGI calls
    its ``close()`` on every path, including a client gone before the first chunk; that is also
    where the request is counted, with the bytes actually handed to the server.
    """
    reader = source.open()
    output: Generator[bytes, None, None] | None = None
    try:
        output = _guard_stream(
            lambda: etl.transform_stream(reader, req.path, req.etl_args), recorder
        )
        first = next(output, None)
    except BaseException:
        if output is not None:
            output.close()
        etl.close_reader(reader)
        raise
    progress = _Progress()
    chunks = _after_headers(etl, req, first, output, progress)

    def count() -> None:
        track.bytes_in = _bytes_read(reader, source)
        track.finish(STATUS_ABORTED if progress.failed else HTTPStatus.OK, progress.sent)

    body = ClosingBody(chunks, [output.close, lambda: etl.close_reader(reader), count])
    return Reply(HTTPStatus.OK, body, content_type=etl.get_mime_type())


def _bytes_read(reader: IO[bytes], source: Source) -> int:
    """Input bytes the transform read: counted by our readers; a file's size otherwise."""
    count = getattr(reader, "bytes_read", None)
    if isinstance(count, int):
        return count
    return source.size_hint() or 0


def _guard_stream(
    start: Callable[[], Iterable[bytes]], recorder: Recorder = metrics.NULL
) -> Generator[bytes, None, None]:
    """The user's stream (``start()``, called at the first ``next``), its failures re-raised as
    :class:`TransformError`, however it fails: calling ``transform_stream`` or iterating it; timed.

    Needed because the stream is consumed inside ``requests`` during a direct put: an ``OSError``
    from the transform would otherwise look like a network error and be retried.
    """
    started = metrics.clock()
    output: Iterable[bytes] = ()
    try:
        output = start()
        for chunk in output:
            if not isinstance(chunk, bytes):
                if not isinstance(chunk, (bytearray, memoryview)):
                    raise TypeError(
                        f"transform_stream() yielded {type(chunk).__name__}, expected bytes"
                    )
                chunk = bytes(chunk)
            yield chunk
    except ETLError:
        raise
    except USER_CODE_FAILURES as exc:
        raise transform_error(exc) from exc
    finally:
        recorder.transform_time("streaming", metrics.clock() - started)
        close = getattr(output, "close", None)
        if close is not None:
            close()


@dataclass
class _Progress:
    """How far a streamed reply got: bytes handed to the server, and whether it was cut."""

    sent: int = 0
    failed: bool = False


def _after_headers(
    etl: ETLServer,
    req: ParsedRequest,
    first: bytes | None,
    rest: Iterator[bytes],
    progress: _Progress,
) -> Iterator[bytes]:
    """The reply body once the status line is out: a failure now can only cut the connection.

    It is logged here, once (object path and cause), and re-raised as :class:`StreamCut`, so the
    server aborts the chunked body instead of terminating it: the target sees a read error, never
    a short object.  The WSGI servers treat it as a dropped connection and do not log it again;
    the WebSocket adapter closes with 1011 without logging it again.
    """
    try:
        if first is not None:
            progress.sent += len(first)
            yield first
        for chunk in rest:
            progress.sent += len(chunk)
            yield chunk
    except ETLError as exc:
        progress.failed = True
        log_error(
            etl,
            req.method,
            req.path,
            exc,
            f"transform_stream failed after {progress.sent} bytes were sent; connection cut",
        )
        raise StreamCut(exc) from exc


def redact(etl: ETLServer, text: str) -> str:
    """``text`` without the per-ETL secret of ``AIS_TARGET_URL`` or ``AIS_AUTHN_TOKEN`` (§7)."""
    return redact_secret(text, etl.host_target, etl.settings.authn_token)


def log_error(
    etl: ETLServer,
    method: str,
    path: str,
    exc: ETLError,
    what: str = "",
    exc_info: BaseException | None = None,
) -> str:
    """Log a failed request or task ONCE, with its object path and cause; the redacted message.

    Every adapter's error mapping calls this (and nothing else logs the same failure): the line
    carries ``path``, ``status`` and ``cause`` as record attributes too, which ``ETL_LOG_FORMAT=
    json`` emits as fields.  The per-ETL secret of ``AIS_TARGET_URL`` is redacted (PROTOCOL.md §7).
    """
    message = redact(etl, exc.message)
    kind = type(exc.__cause__).__name__ if exc.__cause__ is not None else ""
    cause = f"{message} ({kind})" if kind and not message.startswith(kind) else message
    level = logging.ERROR if exc.status >= 500 or what else logging.WARNING
    extra = {"method": method, "path": path, "status": int(exc.status), "cause": cause}
    outcome = what or f"-> {int(exc.status)}"
    etl.logger.log(
        level, "%s %r %s: %s", method, path, outcome, cause, extra=extra, exc_info=exc_info
    )
    exc.logged = True
    return message


class ClosingBody:
    """A WSGI body iterable whose ``close()`` runs every callback once, even if one fails."""

    def __init__(self, chunks: Iterable[bytes], closers: list[Callable[[], Any]]) -> None:
        self._chunks = chunks
        self._closers = closers

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for closer in closers:
            try:
                closer()
            except Exception:
                log.warning("closing a streamed reply failed", exc_info=True)
