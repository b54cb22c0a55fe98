"""The request flow, framework-free: one path for buffered and streaming (PROTOCOL.md §2-§5).

An adapter (the Flask blueprint, later WebSocket) decodes its request into a
:class:`~etl_wsgi.protocol.ParsedRequest`, calls :func:`handle`, and writes the returned
:class:`Reply`.  Failures are raised as :class:`~etl_wsgi.errors.ETLError` subclasses; the adapter
maps them in one place.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import IO, TYPE_CHECKING, Any

from etl_wsgi.const import DEFAULT_MIME_TYPE
from etl_wsgi.direct_put import Attempt, CountingIterator, DirectPutResult, deliver
from etl_wsgi.errors import ETLError, TransformError
from etl_wsgi.protocol import ParsedRequest, Pipeline, compose_direct_put_url, parse_pipeline
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


def handle(etl: ETLServer, req: ParsedRequest, source: Source) -> Reply:
    """Transform one object and answer, or deliver it to the next hop (§4)."""
    pipeline = checked_pipeline(etl, req)
    if etl.use_streaming:
        if pipeline is None:
            return _stream_reply(etl, req, source)
        return _direct_put(etl, req, pipeline, lambda: _stream_attempt(etl, req, source), source)

    budget = etl.memory_budget
    # Input and output of a buffered transform are both in memory: reserve twice the input.
    hint = source.size_hint()
    held = budget.acquire(2 * (hint or 0))
    try:
        data_in = read_input(etl, source)
        if hint is None:  # size known only now (chunked body, upstream GET)
            held += budget.acquire(2 * len(data_in))
        data = etl.executor.run(_call_transform, etl, req, data_in)
        if pipeline is None:
            return Reply(HTTPStatus.OK, data, content_type=etl.get_mime_type(), held=held)
        reply = _direct_put(etl, req, pipeline, lambda: Attempt(data), None)
        return dataclasses.replace(reply, held=held)
    except BaseException:
        budget.release(held)
        raise


def transform_buffered(etl: ETLServer, req: ParsedRequest, source: Source) -> bytes:
    """Read the input whole (or the FQN path with ``ETL_DIRECT_FQN``) and call ``transform``."""
    return etl.executor.run(_call_transform, etl, req, read_input(etl, source))


def read_input(etl: ETLServer, source: Source) -> bytes | str:
    """The whole input, or the FQN path with ``ETL_DIRECT_FQN`` (the transform opens it).

    FQN reads go through ``etl.executor`` (off the event loop in ``thread`` mode); socket
    inputs are read in the request's greenlet, which owns the socket.
    """
    if etl.direct_fqn and isinstance(source, FileSource):
        return source.check()
    if isinstance(source, FileSource):
        return etl.executor.run(source.read_all)
    return source.read_all()


def _call_transform(etl: ETLServer, req: ParsedRequest, data: bytes | str) -> bytes:
    try:
        out = etl.transform(data, req.path, req.etl_args)
    except ETLError:
        raise
    except Exception as exc:
        raise TransformError(str(exc) or type(exc).__name__) from exc
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
    )
    return reply_from_result(result)


def reply_from_result(result: DirectPutResult) -> Reply:
    """The answer to our caller for the next hop's answer (PROTOCOL.md §4.3)."""
    content_type = result.content_type or DEFAULT_MIME_TYPE if result.body else None
    return Reply(result.status, result.body, result.headers, content_type)


def _stream_attempt(etl: ETLServer, req: ParsedRequest, source: Source) -> Attempt:
    """Open the input afresh and start ``transform_stream`` on it, counting what it yields."""
    reader = source.open()
    try:
        output = _guard_stream(etl.transform_stream(reader, req.path, req.etl_args))
    except BaseException:
        etl.close_reader(reader)
        raise
    return Attempt(CountingIterator(output), [output.close, lambda: etl.close_reader(reader)])


def _stream_reply(etl: ETLServer, req: ParsedRequest, source: Source) -> Reply:
    """Plain streaming reply (PROTOCOL.md §5).

    The first chunk is produced *before* the reply is returned, so a transform that fails at once
    gets a proper 500 instead of a truncated 200.  The body is a :class:`ClosingBody`: WSGI calls
    its ``close()`` on every path, including a client gone before the first chunk.
    """
    reader = source.open()
    output: Generator[bytes, None, None] | None = None
    try:
        output = _guard_stream(etl.transform_stream(reader, req.path, req.etl_args))
        first = next(output, None)
    except BaseException:
        if output is not None:
            output.close()
        etl.close_reader(reader)
        raise
    chunks = _after_headers(etl, req, first, output)
    body = ClosingBody(chunks, [output.close, lambda: etl.close_reader(reader)])
    return Reply(HTTPStatus.OK, body, content_type=etl.get_mime_type())


def _guard_stream(output: Iterable[bytes]) -> Generator[bytes, None, None]:
    """Re-raise failures of the user's stream as :class:`TransformError`.

    Needed because the stream is consumed inside ``requests`` during a direct put: an ``OSError``
    from the transform would otherwise look like a network error and be retried.
    """
    try:
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
    except Exception as exc:
        raise TransformError(str(exc) or type(exc).__name__) from exc
    finally:
        close = getattr(output, "close", None)
        if close is not None:
            close()


def _after_headers(
    etl: ETLServer, req: ParsedRequest, first: bytes | None, rest: Iterator[bytes]
) -> Iterator[bytes]:
    """The reply body once the status line is out: a failure now can only cut the connection.

    It is logged here (with the object path) and re-raised, so the server aborts the chunked
    body instead of terminating it: the target sees a read error, never a short object.
    """
    sent = 0
    try:
        if first is not None:
            sent += len(first)
            yield first
        for chunk in rest:
            sent += len(chunk)
            yield chunk
    except ETLError as exc:
        etl.logger.error(
            "%s %r: transform_stream failed after %d bytes were sent; connection cut: %s",
            req.method,
            req.path,
            sent,
            exc.message,
        )
        raise


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
