"""The stable public face of etl-wsgi: ``ETLServer`` and friends (PROTOCOL.md §8.1).

Same names and meaning as ``aistore.sdk.etl.webserver.base_etl_server`` (2.0.0), so a transformer
ports by changing its import.  Differences, all deliberate (PROTOCOL.md §9.2):

* settings come from :mod:`etl_wsgi.config`, parsed and validated once (bad values raise
  :class:`~etl_wsgi.config.ConfigError` naming the variable);
* the session never retries on its own and every call has a connect/read timeout;
* ``__init__`` has no process side effects: the open-files limit is raised by the gunicorn hook,
  logging is configured by the process, not by the library.

The request flow itself lives in :mod:`etl_wsgi.handler`; framework adapters live in
:mod:`etl_wsgi.blueprint` and :mod:`etl_wsgi.flask_server`.
"""

from __future__ import annotations

import logging
from abc import ABC
from collections.abc import Iterator
from typing import IO, Any

import requests

from etl_wsgi.concurrency import Executor, MemoryBudget
from etl_wsgi.config import Settings
from etl_wsgi.const import (
    DEFAULT_MIME_TYPE,
    DRAIN_CHUNK_BYTES,
    HEADER_DIRECT_PUT_LENGTH,
    RETRY_BACKOFF_BASE,
    RETRY_BACKOFF_MAX,
)
from etl_wsgi.direct_put import (
    SYNC_DIRECT_PUT_TRANSIENT_ERRORS,
    CountingIterator,
    _handle_direct_put_transient_error,
    _is_connection_refused,
    build_session,
    interpret_response,
    put,
)
from etl_wsgi.errors import ETLDirectPutTransientError, InvalidPipelineError
from etl_wsgi.protocol import sanitize_fqn as _sanitize_fqn

__all__ = [
    "DRAIN_CHUNK_BYTES",
    "RETRY_BACKOFF_BASE",
    "RETRY_BACKOFF_MAX",
    "SYNC_DIRECT_PUT_TRANSIENT_ERRORS",
    "CountingIterator",
    "ETLDirectPutTransientError",
    "ETLServer",
    "InvalidPipelineError",
    "_compute_replayable_retries",
    "_handle_direct_put_transient_error",
    "_is_connection_refused",
]


def _compute_replayable_retries(
    fqn: str, is_get: bool, direct_put_retries: int
) -> tuple[bool, int]:
    """``(replayable, effective retries)``: FQN and GET sources re-open, a PUT body not (§4.4)."""
    replayable = bool(fqn) or is_get
    return replayable, direct_put_retries if replayable else 0


class ETLServer(ABC):  # noqa: B024 - ABC kept for parity; abstractness is checked in __init__
    """Base class of a transformer. Override ``transform`` (buffered) or ``transform_stream``.

    * ``transform(data, path, etl_args) -> bytes``: ``data`` is the whole object (``bytes``), or
      its local path (``str``) with ``ETL_DIRECT_FQN`` and an ``etl_fqn`` request.
    * ``transform_stream(reader, path, etl_args) -> Iterator[bytes]``: constant memory.

    Both overridden -> ``transform`` wins; neither -> ``TypeError`` at construction.
    Subclasses that override ``__init__`` must call ``super().__init__()``.

    Attributes: ``settings``, ``host_target`` (``AIS_TARGET_URL``), ``direct_put``,
    ``direct_fqn``, ``direct_put_retries``, ``token``, ``session``, ``logger``, ``use_streaming``.
    """

    def __init__(self) -> None:
        has_transform = type(self).transform is not ETLServer.transform
        has_stream = type(self).transform_stream is not ETLServer.transform_stream
        if not has_transform and not has_stream:
            raise TypeError(
                f"{type(self).__name__} must override either transform() or transform_stream()"
            )
        self.use_streaming = has_stream and not has_transform

        self.settings = Settings.from_env()
        self.host_target = self.settings.ais_target_url
        self.direct_put = self.settings.direct_put
        self.direct_fqn = self.settings.direct_fqn
        self.direct_put_retries = self.settings.direct_put_retries
        self.token = self.settings.authn_token or None
        self.logger = logging.getLogger(type(self).__name__)
        self.session = self._build_session()
        self.executor = Executor(
            self.settings.transform_executor,
            self.settings.transform_threads,
            inline_max_bytes=self.settings.inline_max_bytes,
            inline_max_seconds=self.settings.inline_max_seconds,
        )
        self.memory_budget = MemoryBudget(self.settings.memory_budget, self.settings.memory_wait)

    def _build_session(self) -> requests.Session:
        """Outbound session: TLS/auth from settings, pooled, no hidden retries."""
        return build_session(self.settings)

    # --- to override ------------------------------------------------------------------------

    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        """Buffered transform: return the whole transformed object."""
        raise NotImplementedError("Subclass must override either transform() or transform_stream()")

    def transform_stream(self, reader: IO[bytes], path: str, etl_args: str) -> Iterator[bytes]:
        """Streaming transform: read from ``reader``, yield output chunks."""
        raise NotImplementedError("Subclass must override either transform() or transform_stream()")

    def get_mime_type(self) -> str:
        """Content type of a plain (non direct-put) reply."""
        return DEFAULT_MIME_TYPE

    def start(self) -> None:
        """Serve this ETL for local development (Werkzeug's threaded server on 0.0.0.0:8000).

        In production run gunicorn: ``gunicorn -c gunicorn.conf.py
        'etl_wsgi.app:create_app("pkg.mod:Class")'``.
        """
        from etl_wsgi.app import create_app

        create_app(self).run(host="0.0.0.0", port=8000, threaded=True)

    # --- helpers kept from the SDK ------------------------------------------------------------

    @staticmethod
    def close_reader(reader: Any) -> None:
        """Close ``reader`` if it can be closed; a failing close is logged, not raised."""
        close = getattr(reader, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception:
            logging.getLogger(__name__).warning("closing reader failed", exc_info=True)

    @staticmethod
    def iter_and_close(output_iter: Iterator[bytes], reader: Any) -> Iterator[bytes]:
        """Yield from ``output_iter``; close ``reader`` afterwards, whatever happens."""
        try:
            yield from output_iter
        finally:
            ETLServer.close_reader(reader)

    @staticmethod
    def make_direct_put_headers(direct_put_length: int) -> dict[str, str]:
        """``{"Ais-Direct-Put-Length": n}`` when ``n != 0``, else ``{}`` (PROTOCOL.md §4.3)."""
        if direct_put_length != 0:
            return {HEADER_DIRECT_PUT_LENGTH: str(direct_put_length)}
        return {}

    def sanitize_fqn(self, fqn: str) -> str:
        """``etl_fqn`` -> absolute normalized path (second percent-decode; PROTOCOL.md §3)."""
        return _sanitize_fqn(fqn)

    def client_put(
        self, url: str, data: Any, headers: dict[str, str], timeout: Any = None
    ) -> requests.Response:
        """PUT through the session; default timeout is ``(ETL_CONNECT_TIMEOUT, ETL_READ_TIMEOUT)``.

        Redirects are not followed: a redirect would re-send a body that may be a consumed stream.
        """
        return put(
            self.session, url, data, headers, self.settings.timeouts if timeout is None else timeout
        )

    def handle_direct_put_response(
        self, resp: requests.Response, data: bytes, data_length: int = -1
    ) -> tuple[int, bytes, int]:
        """``(status, body, direct_put_length)`` for the next hop's reply (PROTOCOL.md §4.3).

        ``data_length >= 0`` overrides ``len(data)`` (a streamed body's ``bytes_sent``).
        """
        result = interpret_response(resp, data_length if data_length >= 0 else len(data))
        if result.status >= 400:
            self.logger.error(
                "Direct put failed to %s: HTTP %s - %r", resp.url, result.status, result.body[:200]
            )
        return result.status, result.body, result.delivered
