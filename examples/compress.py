"""Compress or decompress with gzip or bz2 (ais-etl ``transformers/compress``).

    gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app("examples.compress:Compress")'

Options are a JSON object, per request in ``etl_args`` and as defaults in ``COMPRESS_OPTIONS``:

* ``"mode"``: ``"compress"`` (default) or ``"decompress"``;
* ``"compression"``: ``"gzip"`` (default) or ``"bz2"`` (ais-etl's key; ``"format"`` is accepted
  as another name for it).

e.g. ``etl_args={"mode":"decompress","compression":"bz2"}``.  Unlike ais-etl, which ignores
what it cannot parse and falls back to the defaults, bad ``etl_args`` answer ``400`` and a bad
``COMPRESS_OPTIONS`` stops the server at start-up; input that is not valid gzip/bz2 data answers
``422``.  Buffered on purpose: (de)compression is CPU work, and buffered transforms run in the
worker's thread pool, where zlib and bz2 release the GIL.
"""

from __future__ import annotations

import bz2
import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from etl_wsgi import ETLError, ETLServer
from etl_wsgi.errors import BadRequestError
from examples._common import env_setting, json_options, read_bytes, request_options

KEYS = ("mode", "compression", "format")
CODECS: dict[tuple[str, str], Callable[[bytes], bytes]] = {
    ("compress", "gzip"): gzip.compress,
    ("compress", "bz2"): bz2.compress,
    ("decompress", "gzip"): gzip.decompress,
    ("decompress", "bz2"): bz2.decompress,
}
#: What a decompressor raises on input that is not in its format (or is truncated).
BAD_DATA = (OSError, EOFError, zlib.error)


@dataclass(frozen=True)
class Options:
    mode: str = "compress"
    compression: str = "gzip"

    def merged(self, raw: dict[str, Any]) -> Options:
        """These options overridden by a parsed JSON object; ``ValueError`` if it is invalid."""
        if "format" in raw and "compression" in raw and raw["format"] != raw["compression"]:
            raise ValueError("'format' and 'compression' disagree; give one of them")
        mode = raw.get("mode", self.mode)
        compression = raw.get("compression", raw.get("format", self.compression))
        if not (isinstance(mode, str) and isinstance(compression, str)) or (
            (mode, compression) not in CODECS
        ):
            raise ValueError(
                f"unsupported mode {mode!r} / compression {compression!r}: mode is "
                "'compress' or 'decompress', compression is 'gzip' or 'bz2'"
            )
        return Options(mode, compression)


def _env_options(raw: str) -> Options:
    return Options().merged(json_options(raw, KEYS, "JSON"))


class Compress(ETLServer):
    """gzip/bz2 compress or decompress, chosen per request by JSON ``etl_args``."""

    def __init__(self) -> None:
        super().__init__()
        self.defaults: Options = env_setting("COMPRESS_OPTIONS", "", _env_options)

    def options(self, etl_args: str) -> Options:
        """The request's options: ``etl_args`` over ``COMPRESS_OPTIONS``; ``400`` if invalid."""
        try:
            return self.defaults.merged(request_options(etl_args, KEYS))
        except ValueError as exc:
            raise BadRequestError(f"etl_args: {exc}") from None

    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        opts = self.options(etl_args)
        codec = CODECS[opts.mode, opts.compression]
        data = read_bytes(data)
        try:
            return codec(data)
        except BAD_DATA as exc:
            raise ETLError(
                f"{path}: not valid {opts.compression} data: {exc}",
                status=HTTPStatus.UNPROCESSABLE_ENTITY,
            ) from None
