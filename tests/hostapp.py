"""Host Flask apps embedding ETLs with ``ETLExtension`` (served as ``hostapp:make_app()``).

Imported by gunicorn workers with ``tests/`` on ``PYTHONPATH`` (transformers as
``transformers:X``), and in-process by the tests (``tests.hostapp``, ``tests.transformers:X``).
"""

from __future__ import annotations

import gc
import os

from flask import Flask, jsonify, request

from etl_wsgi import ETLExtension


def _host_app(health: bool) -> Flask:
    """Host routes; ``health``: its own ``GET /health`` (the launcher polls it before serving)."""
    app = Flask("hostapp")

    if health:

        @app.get("/health")
        def host_health():
            return "host healthy"

    @app.get("/")
    def index():
        return "host index"

    @app.get("/hello")
    def hello():
        return "host hello"

    @app.put("/api/items/<name>")
    def put_item(name: str):
        return jsonify(name=name, size=len(request.get_data()))

    return app


def make_app(module: str = "transformers") -> Flask:
    """Host routes (with ``/health``) plus ``Upper`` at ``/etl`` and ``Inspect`` at ``/inspect``.

    One ETL is mounted by the constructor form, the other by ``init_app``.
    """
    app = _host_app(health=True)
    ETLExtension(app, etl=f"{module}:Upper", url_prefix="/etl")
    ext = ETLExtension()
    ext.init_app(app, etl=f"{module}:Inspect", url_prefix="/inspect")
    return app


def make_root_app(module: str = "transformers") -> Flask:
    """Host routes plus ``Upper`` at the root (its ``/health``), behind the host's own routes."""
    app = _host_app(health=False)
    ETLExtension().init_app(app, etl=f"{module}:Upper")
    return app


def make_soak_app(module: str = "transformers") -> Flask:
    """tests/test_soak.py: ``Upper`` at ``/b``, ``UpperStream`` at ``/s``, one worker process.

    ``GET /debug/greenlets`` is a test-only introspection hook (it lives here, not in the
    package): the worker's pid and the number of greenlet objects alive after a collection.
    """
    import greenlet
    from gevent.monkey import get_original

    app = _host_app(health=True)
    ETLExtension(app, etl=f"{module}:Upper", url_prefix="/b")
    ETLExtension(app, etl=f"{module}:UpperStream", url_prefix="/s")

    @app.get("/debug/greenlets")
    def greenlets():
        gc.collect()
        alive = sum(isinstance(o, greenlet.greenlet) for o in gc.get_objects())
        # Hold this worker's event loop a moment (the unpatched sleep): probes sent at the same
        # time are accepted by the other workers (the kernel need not spread sequential ones).
        get_original("time", "sleep")(0.05)
        return jsonify(pid=os.getpid(), greenlets=alive)

    return app
