"""gunicorn configuration of the ETL pod (gevent workers; settings from the environment).

    gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app("pkg.mod:Class")'

Thin on purpose: it imports only etl_wsgi.gunicorn_hooks, which never imports requests or ssl
(the gevent worker monkey-patches after fork). Every value comes from an ETL_* setting; see the
README's settings table. Command-line flags given to gunicorn still override these.
"""

from etl_wsgi import gunicorn_hooks

globals().update(gunicorn_hooks.config_values())

on_starting = gunicorn_hooks.on_starting
when_ready = gunicorn_hooks.when_ready
