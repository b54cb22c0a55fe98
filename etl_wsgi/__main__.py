"""``python -m etl_wsgi ...``: the ``etl-wsgi`` command (:mod:`etl_wsgi.cli`)."""

from etl_wsgi.cli import main

if __name__ == "__main__":
    main(prog_name="etl-wsgi")
