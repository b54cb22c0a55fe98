"""Helpers shared by the bundled examples: input bytes and JSON options.

Examples read their own environment variables (like the ais-etl transformers they port); a bad
value stops the server at start-up with :class:`~etl_wsgi.config.ConfigError` naming the
variable, and bad per-request ``etl_args`` answer ``400`` via
:class:`~etl_wsgi.errors.BadRequestError` (PROTOCOL.md §7), never a ``500``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from typing import Any

from etl_wsgi.config import ConfigError
from etl_wsgi.errors import BadRequestError


def read_bytes(data: bytes | str) -> bytes:
    """The object's bytes; with ``ETL_DIRECT_FQN=true`` ``data`` is its local path instead."""
    if isinstance(data, str):
        with open(data, "rb") as f:
            return f.read()
    return data


def json_options(text: str, allowed: Collection[str], where: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object with keys from ``allowed`` (empty text: ``{}``).

    Raises ``ValueError`` saying what is wrong; ``where`` names the source in the message.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object, got {text!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    return value


def request_options(etl_args: str, allowed: Collection[str]) -> dict[str, Any]:
    """:func:`json_options` of a request's ``etl_args``; a bad one is a ``400``."""
    try:
        return json_options(etl_args, allowed, "etl_args")
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None


def env_setting(name: str, default: str, parse: Callable[[str], Any]) -> Any:
    """``parse(os.environ[name] or default)``; a ``ValueError`` becomes a ``ConfigError``."""
    raw = os.environ.get(name, "").strip() or default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r}: {exc}") from None
