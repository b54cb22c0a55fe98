"""MD5: the object's MD5 as 32 lowercase hex digits (ais-etl ``transformers/md5``).

gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app("examples.md5:Md5")'
"""

from __future__ import annotations

import hashlib

from etl_wsgi import ETLServer

CHUNK = 1 << 20


class Md5(ETLServer):
    """Buffered: runs in the worker's thread pool, where hashlib releases the GIL.

    With ``ETL_DIRECT_FQN=true`` the file is hashed in 1 MiB chunks, never held whole.
    ``usedforsecurity=False``: a checksum, so it also works on FIPS-mode hosts.
    """

    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        digest = hashlib.md5(usedforsecurity=False)
        if isinstance(data, str):
            with open(data, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
        else:
            digest.update(data)
        return digest.hexdigest().encode()
