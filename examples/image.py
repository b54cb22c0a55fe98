"""Resize images and make them grayscale with Pillow (after ais-etl's image transformers).

    IMAGE_SIZE=224x224 IMAGE_FORMAT=PNG gunicorn -c gunicorn.conf.py \\
        'etl_wsgi.app:create_app("examples.image:ResizeGrayscale")'

Every object is decoded (any format Pillow reads), converted to 8-bit grayscale (mode ``L``),
resized to exactly ``WIDTHxHEIGHT`` and encoded as ``IMAGE_FORMAT`` (``PNG``, the default, or
``JPEG``, ``WEBP``, ...; it also sets the reply's ``Content-Type``).  The size comes from
``etl_args`` as JSON ``{"size": [W, H]}``, else from ``IMAGE_SIZE`` (default ``224x224``).
A bad ``etl_args`` answers ``400``; an object Pillow cannot decode answers ``422``; bad
``IMAGE_SIZE``/``IMAGE_FORMAT`` stop the server at start-up.  Needs ``pillow`` (the
``examples`` extra).  Buffered: decoding and resizing are CPU work, run in the worker's thread
pool (Pillow releases the GIL while it resamples).
"""

from __future__ import annotations

import io
from http import HTTPStatus
from typing import Any

from PIL import Image, UnidentifiedImageError

from etl_wsgi import ETLError, ETLServer
from etl_wsgi.errors import BadRequestError
from examples._common import env_setting, read_bytes, request_options

MAX_SIDE = 1 << 14


def check_size(value: Any) -> tuple[int, int]:
    """``[W, H]`` of positive ints up to 16384, else ``ValueError``."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if ok and all(type(v) is int and 0 < v <= MAX_SIDE for v in value):
        return (value[0], value[1])
    raise ValueError(f"size must be [width, height] of integers in 1..{MAX_SIDE}, got {value!r}")


def parse_size(text: str) -> tuple[int, int]:
    """``"224x224"`` -> ``(224, 224)``."""
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise ValueError("expected WIDTHxHEIGHT, e.g. 224x224")
    return check_size([int(width), int(height)])


def parse_format(text: str) -> str:
    """A Pillow format it can write (``PNG``, ``JPEG``, ...)."""
    fmt = text.upper()
    Image.init()
    if fmt not in Image.SAVE:
        raise ValueError(f"Pillow cannot write {text!r}; e.g. PNG, JPEG, WEBP")
    return fmt


class ResizeGrayscale(ETLServer):
    """Image -> grayscale ``W x H`` image in ``IMAGE_FORMAT``."""

    def __init__(self) -> None:
        super().__init__()
        self.size: tuple[int, int] = env_setting("IMAGE_SIZE", "224x224", parse_size)
        self.format: str = env_setting("IMAGE_FORMAT", "PNG", parse_format)

    def get_mime_type(self) -> str:
        return Image.MIME.get(self.format, "application/octet-stream")

    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        size = self.size
        options = request_options(etl_args, ("size",))
        if "size" in options:
            try:
                size = check_size(options["size"])
            except ValueError as exc:
                raise BadRequestError(f"etl_args: {exc}") from None
        raw = read_bytes(data)
        try:
            with Image.open(io.BytesIO(raw)) as img:
                out = img.convert("L").resize(size, Image.Resampling.LANCZOS)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ETLError(
                f"{path}: not a decodable image: {exc}", status=HTTPStatus.UNPROCESSABLE_ENTITY
            ) from None
        buf = io.BytesIO()
        out.save(buf, format=self.format)
        return buf.getvalue()
