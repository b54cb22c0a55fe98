"""Echo: the object, unchanged (ais-etl ``transformers/echo``).

gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app("examples.echo:Echo")'
"""

from __future__ import annotations

from etl_wsgi import ETLServer
from examples._common import read_bytes


class Echo(ETLServer):
    """Returns its input; the smallest ETL, handy to measure the server itself."""

    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        return read_bytes(data)
