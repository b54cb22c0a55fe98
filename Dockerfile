# etl-wsgi runtime image: gunicorn with gevent workers serving the class named by ETL_CLASS
# (or shipped in ETL_CLASS_PAYLOAD). Build your own on it:
#
#   FROM <this image>
#   COPY my_etl.py /app/
#   ENV ETL_CLASS=my_etl:MyETL
#
# AIS sets AIS_TARGET_URL and direct_put in the pod; every other setting is in README.md. AIS ETL
# specs using this image are in examples/specs/.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY setup.cfg setup.py README.md gunicorn.conf.py /app/
COPY etl_wsgi /app/etl_wsgi
COPY examples /app/examples
# The "examples" extra (xxhash, pillow) makes every bundled example servable by ETL_CLASS alone.
RUN pip install '/app[examples]' \
    && useradd --uid 1000 --no-create-home --home-dir /app etl

# Non-root. gunicorn puts its working directory (/app) on sys.path: my_etl.py and examples/ import.
USER 1000
EXPOSE 8000

# Follows the default ETL_BIND (0.0.0.0:8000); Kubernetes uses AIS's readiness probe instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"

# The open-files soft limit is raised to the hard limit by gunicorn's on_starting hook
# (etl_wsgi.gunicorn_hooks.raise_nofile_limit), as AIS's runtime image does with `ulimit -n
# $(ulimit -Hn)`; the hard limit itself is the container runtime's (a non-root user cannot raise
# it). The hook runs for any command that loads etl_wsgi.gunicorn_conf, as this one does.
CMD ["gunicorn", "-c", "python:etl_wsgi.gunicorn_conf", "etl_wsgi.app:create_app()"]
