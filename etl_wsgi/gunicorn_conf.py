"""gunicorn configuration as an importable module: ``gunicorn -c python:etl_wsgi.gunicorn_conf``.

Same content as the repository's top-level ``gunicorn.conf.py`` (which imports this), so an
installed package has its configuration too (Docker images, ``etl_wsgi.testing``). Imports only
:mod:`etl_wsgi.gunicorn_hooks`: never ``requests`` or ``ssl`` in the master.
"""

from etl_wsgi import gunicorn_hooks

globals().update(gunicorn_hooks.config_values())

on_starting = gunicorn_hooks.on_starting
post_fork = gunicorn_hooks.post_fork
post_worker_init = gunicorn_hooks.post_worker_init
when_ready = gunicorn_hooks.when_ready
child_exit = gunicorn_hooks.child_exit
worker_exit = gunicorn_hooks.worker_exit
on_exit = gunicorn_hooks.on_exit
