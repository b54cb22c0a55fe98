# etl-wsgi runtime image: gunicorn with gevent workers serving the class named by ETL_CLASS.
#
#   FROM <this image>
#   COPY my_etl.py /app/
#   ENV ETL_CLASS=my_etl:MyETL
#
# AIS sets AIS_TARGET_URL (and direct_put) in the pod; every other setting is in README.md.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY setup.cfg setup.py README.md gunicorn.conf.py /app/
COPY etl_wsgi /app/etl_wsgi
COPY examples /app/examples
RUN pip install /app \
    && useradd --uid 1000 --no-create-home --home-dir /app etl

USER 1000
EXPOSE 8000
ENV ETL_CLASS=examples.upper:Upper

HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"

# The open-files soft limit is raised to the hard limit by the gunicorn on_starting hook.
CMD ["gunicorn", "-c", "/app/gunicorn.conf.py", "etl_wsgi.app:create_app()"]
