"""Streaming: a JSON Lines object becomes a TAR archive, one member per line.

    gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app("examples.jsonl_tar:JsonlToTar")'

Each non-empty line is a JSON object ``{"name": "dir/file.txt", "content": "text"}`` (stored
UTF-8 encoded) or ``{"name": ..., "data": "<base64>"}`` (binary).  Members are written in order,
in POSIX (pax) format with ``mtime`` 0 and mode ``0644``, so the same input always gives the same
archive (AIS may replay a request).  Memory stays bounded by the longest line
(``JSONL_MAX_LINE``, default 64 MiB), whatever the object size: this uses ``transform_stream``,
which reads the input as it arrives and sends each member as soon as it is built.

A bad line (not JSON, no/unsafe ``name``, neither or both of ``content``/``data``, bad base64,
too long) is an error: on the first line it answers ``422`` before any byte is sent; later,
the reply has already started, so the connection is cut and the target sees a failed read, never
a short archive (README, "Write a transformer").
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from http import HTTPStatus
from typing import IO, Any

from etl_wsgi import ETLError, ETLServer
from examples._common import env_setting

CHUNK = 1 << 16
TAR_MIME = "application/x-tar"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise ValueError("expected a positive number of bytes")
    return int(text)


class BadLine(ETLError):
    """A JSON line that cannot become a tar member -> 422."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY

    def __init__(self, number: int, why: str) -> None:
        super().__init__(f"line {number}: {why}")


def iter_lines(reader: IO[bytes], max_line: int) -> Iterator[tuple[int, bytes]]:
    """``(number, line)`` of ``reader``'s non-empty lines, read in 64 KiB chunks."""
    parts: list[bytes] = []  # the line being read, unsplit pieces (no quadratic re-scans)
    size = number = 0
    while chunk := reader.read(CHUNK):
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            line, parts, size = b"".join([*parts, piece]), [], 0
            number += 1
            if line.strip():
                yield number, line
        parts.append(rest)
        size += len(rest)
        if size > max_line:
            raise BadLine(number + 1, f"longer than JSONL_MAX_LINE={max_line} bytes")
    line = b"".join(parts)
    if line.strip():
        yield number + 1, line


def member(number: int, line: bytes) -> tuple[tarfile.TarInfo, bytes]:
    """The tar header and payload of one JSON line (``BadLine`` if it is not a valid one)."""
    try:
        record: Any = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadLine(number, f"not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise BadLine(number, "not a JSON object")
    name = record.get("name")
    if not isinstance(name, str) or not name:
        raise BadLine(number, "'name' must be a non-empty string")
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm == ".." or norm.startswith("../") or norm == ".":
        raise BadLine(number, f"unsafe member name {name!r}")
    payload = _payload(number, record)
    info = tarfile.TarInfo(norm)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0
    return info, payload


def _payload(number: int, record: dict[str, Any]) -> bytes:
    content, data = record.get("content"), record.get("data")
    if (content is None) == (data is None):
        raise BadLine(number, "give exactly one of 'content' (text) or 'data' (base64)")
    if content is not None:
        if not isinstance(content, str):
            raise BadLine(number, "'content' must be a string")
        return content.encode()
    if not isinstance(data, str):
        raise BadLine(number, "'data' must be a base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise BadLine(number, f"'data' is not base64: {exc}") from None


class _Sink(io.RawIOBase):
    """Where ``tarfile`` writes; :meth:`take` hands over what it wrote since the last call."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class JsonlToTar(ETLServer):
    """JSON Lines in, TAR out, constant memory (``transform_stream``)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_line: int = env_setting("JSONL_MAX_LINE", str(64 << 20), _positive)

    def get_mime_type(self) -> str:
        return TAR_MIME

    def transform_stream(self, reader: IO[bytes], path: str, etl_args: str) -> Iterator[bytes]:
        sink = _Sink()
        # "w|": a pure stream; tarfile never seeks or tells (the output is not a file).
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            for number, line in iter_lines(reader, self.max_line):
                info, payload = member(number, line)
                archive.addfile(info, io.BytesIO(payload))
                if chunk := sink.take():
                    yield chunk
        yield sink.take()  # the rest and the end-of-archive blocks, written by close()
