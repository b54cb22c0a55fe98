"""gunicorn configuration of the ETL pod (gevent workers; settings from the environment).

    gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app("pkg.mod:Class")'

Thin on purpose: the settings and hooks live in etl_wsgi.gunicorn_conf (also usable as
``-c python:etl_wsgi.gunicorn_conf``), which imports only etl_wsgi.gunicorn_hooks and never
requests or ssl (the gevent worker monkey-patches after fork). Every value comes from an ETL_*
setting; see the README's settings table. Command-line flags still override these.
"""

from etl_wsgi.gunicorn_conf import *  # noqa: F403
from etl_wsgi.gunicorn_conf import (  # noqa: F401
    child_exit,
    on_exit,
    on_starting,
    post_fork,
    post_worker_init,
    when_ready,
    worker_exit,
)
