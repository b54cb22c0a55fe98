"""aistore 2.0.0 reference servers for side_by_side.py (imported only inside .bench-venv).

The same transforms as transformers.py (Echo, EchoStream, Md5), as subclasses of aistore's own
``FlaskServer`` and ``FastAPIServer``. Like the aistore runtime image's ``server.py``, this module
builds one instance per worker process at import time, named ``server``; the class is chosen by
the ``BENCH_AIS_CLASS`` environment variable (e.g. ``FastAPIMd5``). Served as the runtime's
bootstrap does:

    gunicorn ais_servers:app --bind 127.0.0.1:PORT --workers 4              (FlaskServer)
    uvicorn ais_servers:server.app --host 127.0.0.1 --port PORT --workers 4 \\
        --no-access-log --ws-max-size 17179869184 ...                         (FastAPIServer)

(gunicorn 27 only accepts a plain name or a call after the colon, not ``server.app`` as the
runtime's bootstrap writes it, hence the ``app`` alias.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import IO

from aistore.sdk.etl.webserver.fastapi_server import FastAPIServer
from aistore.sdk.etl.webserver.flask_server import FlaskServer

CHUNK = 1 << 20


def _echo(data: bytes | str) -> bytes:
    assert isinstance(data, bytes)
    return data


def _md5(data: bytes | str) -> bytes:
    assert isinstance(data, bytes)
    return hashlib.md5(data).hexdigest().encode()


def _echo_stream(reader: IO[bytes]) -> Iterator[bytes]:
    while chunk := reader.read(CHUNK):
        yield chunk


class FlaskEcho(FlaskServer):
    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        return _echo(data)


class FlaskMd5(FlaskServer):
    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        return _md5(data)


class FlaskEchoStream(FlaskServer):
    def transform_stream(self, reader: IO[bytes], path: str, etl_args: str) -> Iterator[bytes]:
        return _echo_stream(reader)


class FastAPIEcho(FastAPIServer):
    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        return _echo(data)


class FastAPIMd5(FastAPIServer):
    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        return _md5(data)


class FastAPIEchoStream(FastAPIServer):
    def transform_stream(self, reader: IO[bytes], path: str, etl_args: str) -> Iterator[bytes]:
        return _echo_stream(reader)


CLASSES = {
    cls.__name__: cls
    for cls in (FlaskEcho, FlaskMd5, FlaskEchoStream, FastAPIEcho, FastAPIMd5, FastAPIEchoStream)
}

server = CLASSES[os.environ.get("BENCH_AIS_CLASS", "FlaskEcho")]()
app = server.app
