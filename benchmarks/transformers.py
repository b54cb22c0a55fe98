"""Transformers measured by the benchmarks (imported by gunicorn workers as ``transformers:X``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import IO

from etl_wsgi import ETLServer


class Echo(ETLServer):
    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        assert isinstance(data, bytes)
        return data


class EchoStream(ETLServer):
    def transform_stream(self, reader: IO[bytes], path: str, etl_args: str) -> Iterator[bytes]:
        while chunk := reader.read(1 << 20):
            yield chunk


class Md5(ETLServer):
    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        assert isinstance(data, bytes)
        return hashlib.md5(data).hexdigest().encode()
