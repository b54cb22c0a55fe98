"""Hello World: every object becomes ``b"Hello World!"`` (ais-etl ``transformers/hello_world``).

gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app("examples.hello_world:HelloWorld")'
"""

from __future__ import annotations

from etl_wsgi import ETLServer

GREETING = b"Hello World!"


class HelloWorld(ETLServer):
    """Ignores its input (with ``ETL_DIRECT_FQN=true`` it does not even open the file)."""

    def transform(self, data: bytes | str, path: str, etl_args: str) -> bytes:
        return GREETING
