"""Upper-case transformers: the smallest buffered and streaming ETLs.

gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app("examples.upper:Upper")'
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from etl_wsgi import ETLServer


class Upper(ETLServer):
    """Buffered: gets the whole object, returns the whole result."""

    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        if isinstance(data, str):  # ETL_DIRECT_FQN=true: the object's local path
            with open(data, "rb") as f:
                data = f.read()
        return data.upper()


class UpperStream(ETLServer):
    """Streaming: constant memory, whatever the object size."""

    def transform_stream(self, reader: IO[bytes], path: str, etl_args: str) -> Iterator[bytes]:
        while chunk := reader.read(1 << 20):
            yield chunk.upper()
