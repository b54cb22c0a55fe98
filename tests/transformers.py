"""Transformers for the end-to-end tests (gunicorn workers import them as ``transformers:X``)."""

from __future__ import annotations

from etl_wsgi import ETLServer, FlaskServer


def _read(data):
    if isinstance(data, str):  # ETL_DIRECT_FQN: we get the path
        with open(data, "rb") as f:
            return f.read()
    return data


class Upper(ETLServer):
    """Buffered upper-case; raises ValueError('bad') on the input b'boom'."""

    def transform(self, data, path, etl_args):
        data = _read(data)
        if data == b"boom":
            raise ValueError("bad")
        return data.upper()


class Echo(ETLServer):
    def transform(self, data, path, etl_args):
        return _read(data)


class Inspect(ETLServer):
    """Replies with what transform() received: type of data, path, etl_args."""

    def transform(self, data, path, etl_args):
        kind = "str:" + data if isinstance(data, str) else "bytes:" + data.decode("latin-1")
        return f"{kind}|{path}|{etl_args}".encode()


class UpperStream(ETLServer):
    """Streaming upper-case in 64 KiB chunks."""

    def transform_stream(self, reader, path, etl_args):
        while True:
            chunk = reader.read(65536)
            if not chunk:
                break
            yield chunk.upper()


class StreamFailFirst(ETLServer):
    """Streaming transform that raises before producing any chunk."""

    def transform_stream(self, reader, path, etl_args):
        raise ValueError("bad stream")
        yield b""  # pragma: no cover


class StreamReads3(ETLServer):
    """Reads only 3 bytes of the input and stops (keep-alive must survive)."""

    def transform_stream(self, reader, path, etl_args):
        yield reader.read(3).upper()


class UpperFlask(FlaskServer):
    def transform(self, data, path, etl_args):
        return _read(data).upper()


def make_flask_app():
    """A FlaskServer subclass instance's .app, as ported ais-etl code exposes it."""
    return UpperFlask().app
