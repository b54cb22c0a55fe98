"""XXHash64 with a seed (ais-etl ``transformers/hash_with_args``): 16 lowercase hex digits.

    SEED_DEFAULT=42 gunicorn -c gunicorn.conf.py \\
        'etl_wsgi.app:create_app("examples.hash_with_args:HashWithArgs")'

``etl_args`` is the seed, a decimal integer in ``[0, 2**64)``; without it ``SEED_DEFAULT``
(default ``0``) is used.  Unlike ais-etl, a seed that is not such an integer is refused with
``400`` instead of silently hashing with the default seed (a wrong hash is worse than an error),
and a bad ``SEED_DEFAULT`` stops the server at start-up.  Needs ``xxhash`` (the ``examples``
extra).
"""

from __future__ import annotations

import xxhash

from etl_wsgi import ETLServer
from etl_wsgi.errors import BadRequestError
from examples._common import env_setting, read_bytes

MAX_SEED = 2**64 - 1


def parse_seed(text: str) -> int:
    """A decimal seed in ``[0, 2**64)``, else ``ValueError``."""
    try:
        seed = int(text, 10)
    except ValueError:
        raise ValueError(f"seed must be a decimal integer, got {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


class HashWithArgs(ETLServer):
    """``xxhash.xxh64(data, seed).hexdigest()``; seed from ``etl_args`` or ``SEED_DEFAULT``."""

    def __init__(self) -> None:
        super().__init__()
        self.default_seed: int = env_setting("SEED_DEFAULT", "0", parse_seed)

    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        seed = self.default_seed
        if etl_args:
            try:
                seed = parse_seed(etl_args)
            except ValueError as exc:
                raise BadRequestError(f"etl_args: {exc}") from None
        return xxhash.xxh64(read_bytes(data), seed=seed).hexdigest().encode()
