"""``ETL_CLASS_PAYLOAD``: a transformer class shipped as base64 of a cloudpickle (PROTOCOL.md §8.3).

aistore's ``init_class`` pickles the user's class with cloudpickle (by value: its code travels in
the payload) and base64-encodes it into the pod's environment.  :func:`load_class` turns it back
into a class in each gunicorn worker (after gevent has patched the standard library: unpickling
may import the class's dependencies).

Compatibility with aistore: a class written for the SDK subclasses one of its servers
(``ETLServer``, ``FastAPIServer``, ``FlaskServer``, ``HTTPMultiThreadedServer``), which the pickle
names *by reference* as ``aistore.sdk.etl.webserver.<module>.<Class>``.  Those references are
resolved to our equivalents (:data:`AISTORE_NAMES`), whether or not ``aistore`` is installed:
the servers share the constructor ``(host="0.0.0.0", port=8000)`` and the overridable methods
(``transform``, ``transform_stream``, ``get_mime_type``) that ``init_class`` relies on.  A class
that uses framework internals of the SDK's servers (FastAPI routes, ``httpx`` clients) is not
portable this way; port its module instead (change the import, ship it with ``ETL_CLASS``).
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
from typing import Any

from etl_wsgi.base_etl_server import ETLServer
from etl_wsgi.config import ConfigError

ENV = "ETL_CLASS_PAYLOAD"
_SDK = "aistore.sdk.etl.webserver."

#: aistore SDK names (module, class) -> (our module, class).  Other names of the SDK's
#: ``base_etl_server`` module resolve to ours of the same name (its public surface, §8.1).
AISTORE_NAMES: dict[tuple[str, str], tuple[str, str]] = {
    (_SDK + "base_etl_server", "ETLServer"): ("etl_wsgi.base_etl_server", "ETLServer"),
    (_SDK + "flask_server", "FlaskServer"): ("etl_wsgi.flask_server", "FlaskServer"),
    (_SDK + "fastapi_server", "FastAPIServer"): ("etl_wsgi.flask_server", "FlaskServer"),
    (_SDK + "http_multi_threaded_server", "HTTPMultiThreadedServer"): (
        "etl_wsgi.flask_server",
        "FlaskServer",
    ),
}


class _Unpickler(pickle.Unpickler):
    """Resolves the aistore SDK's server classes to etl-wsgi's (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        target = AISTORE_NAMES.get((module, name))
        if target is None and module == _SDK + "base_etl_server":
            target = ("etl_wsgi.base_etl_server", name)
        if target is not None:
            module, name = target
        return super().find_class(module, name)


def load_class(payload: str) -> type[ETLServer]:
    """The ``ETLServer`` subclass in ``payload``; :class:`ConfigError` naming ``ETL_CLASS_PAYLOAD``.

    Unpickling runs code from the payload: it is trusted exactly as the pod's image is (AIS puts
    it there from the ETL's owner).
    """
    try:
        raw = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ConfigError(f"{ENV}: not valid base64 ({exc})") from None
    try:  # the payload calls cloudpickle's reconstructors: a dependency, imported by name here
        obj = _Unpickler(io.BytesIO(raw)).load()
    except Exception as exc:
        raise ConfigError(
            f"{ENV}: cannot unpickle the class: {type(exc).__name__}: {exc} (a module the class "
            "needs by reference must be installed in the image; install its package or pickle "
            "it by value with cloudpickle.register_pickle_by_value)"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, ETLServer)):
        raise ConfigError(f"{ENV}: holds {obj!r}, expected an ETLServer subclass")
    return obj
