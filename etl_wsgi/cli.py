"""The ``etl-wsgi`` command: ``serve``, ``run`` and ``check`` a transformer class.

* ``serve`` runs gunicorn as a programmatic application (``gunicorn.app.base.BaseApplication``)
  with exactly the settings and hooks of ``etl_wsgi.gunicorn_conf`` (what ``gunicorn -c
  gunicorn.conf.py`` uses), gevent workers included.
* ``run`` transforms a local directory into another through the real server and a stand-in AIS
  target (:mod:`etl_wsgi.localrun`), with a progress bar and a summary.
* ``check`` validates the settings and the class and prints what ``serve`` would run.

Options such as ``--bind`` or ``--workers`` are the settings of :mod:`etl_wsgi.config` under
another spelling: they are generated from its declarations (same parser, same doc) and set the
setting's environment variable, so there is no second definition.

Thin adapter (STYLE.md): this module translates arguments and presents results. It must not
import ``requests`` (or the user's class) before gunicorn forks its gevent workers, so
everything heavy is imported inside the commands that need it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from etl_wsgi import __version__
from etl_wsgi.config import ConfigError, Settings

if TYPE_CHECKING:
    from etl_wsgi.base_etl_server import ETLServer
    from etl_wsgi.localrun import Obj, Outcome, Summary

_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

#: Settings offered as options of ``serve`` and ``check`` (``--bind`` = ``ETL_BIND``, ...).
SERVE_SETTINGS = (
    "ais_target_url",
    "bind",
    "workers",
    "worker_connections",
    "worker_timeout",
    "graceful_timeout",
    "keepalive",
    "log_level",
)
#: ``run`` binds 127.0.0.1 itself and points ``AIS_TARGET_URL`` at its stand-in target.
RUN_SETTINGS = ("workers", "worker_connections", "log_level")


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _validate_setting(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Parse with the setting's own parser (which is its validator); keep the raw string."""
    if value is None:
        return None
    meta = _FIELDS[str(param.name)].metadata
    try:
        meta["parse"](value.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}") from None
    return value.strip()


def setting_options(names: tuple[str, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One option per setting, its help being the setting's doc and environment variable."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            meta = _FIELDS[name].metadata
            func = click.option(
                option_name(name),
                name,
                default=None,
                metavar="VALUE",
                callback=_validate_setting,
                help=f"{meta['doc']} [sets {meta['env']}]",
            )(func)
        return func

    return decorate


def setting_env(values: Mapping[str, Any]) -> dict[str, str]:
    """``{ENV_NAME: raw value}`` for the setting options given on the command line."""
    return {
        _FIELDS[name].metadata["env"]: value
        for name, value in values.items()
        if name in _FIELDS and value is not None
    }


def settings_from(environ: Mapping[str, str], require_target: bool) -> Settings:
    try:
        return Settings.from_env(environ, require_target=require_target)
    except ConfigError as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from None


def import_path_of_cwd() -> None:
    """Make ``pkg.mod`` of the working directory importable, as ``gunicorn`` does (``chdir``)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def load_etl_class(spec: str) -> type[ETLServer]:
    """Import ``pkg.mod:Class``; a bad path or a non-ETLServer is a usage error."""
    from werkzeug.utils import ImportStringError, import_string

    from etl_wsgi.base_etl_server import ETLServer

    if ":" not in spec:
        raise click.BadParameter(f"{spec!r}: expected pkg.module:Class", param_hint="ETL_CLASS")
    try:
        obj = import_string(spec.strip())
    except ImportStringError as exc:
        raise click.BadParameter(
            f"cannot import {spec!r}: {exc.exception}", param_hint="ETL_CLASS"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, ETLServer)):
        raise click.BadParameter(f"{spec!r} is not an ETLServer subclass", param_hint="ETL_CLASS")
    return obj


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="etl-wsgi")
def main() -> None:
    """Serve, run locally, or check an AIStore ETL transformer class (pkg.module:Class)."""
    import_path_of_cwd()


# ---- serve --------------------------------------------------------------------------------------


@main.command()
@click.argument("etl_class", metavar="ETL_CLASS")
@setting_options(SERVE_SETTINGS)
def serve(etl_class: str, **options: Any) -> None:
    """Serve ETL_CLASS with gunicorn gevent workers, configured like gunicorn.conf.py.

    Equivalent to: gunicorn -c gunicorn.conf.py 'etl_wsgi.app:create_app("ETL_CLASS")'.
    Every other setting is read from the environment (see `etl-wsgi check`).
    """
    os.environ.update(setting_env(options))  # this process is the server: its settings
    settings_from(os.environ, require_target=True)
    from etl_wsgi.gunicorn_app import ETLApplication

    ETLApplication(etl_class).run()


# ---- run ----------------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def print_summary(summary: Summary) -> None:
    ok = summary.objects - len(summary.failures)
    seconds = max(summary.seconds, 1e-6)
    click.echo(
        f"{ok}/{summary.objects} objects transformed, {_human(summary.bytes_in)} in, "
        f"{_human(summary.bytes_out)} out, {summary.seconds:.2f}s, "
        f"{_human(summary.bytes_in / seconds)}/s, {summary.objects / seconds:.1f} objects/s"
    )
    if summary.failures:
        click.echo(f"{len(summary.failures)} failed:", err=True)
        for outcome in summary.failures:
            click.echo(f"  {outcome.obj.name}: {outcome.error}", err=True)


@contextmanager
def progress(label: str, objects: list[Obj]) -> Iterator[Callable[[Outcome], None]]:
    """A progress bar on stderr when it is a terminal (objects, %, ETA, rate); else silent."""
    total = sum(o.size for o in objects)
    bar = click.progressbar(
        length=max(total, 1),
        label=label,
        file=sys.stderr,
        show_eta=True,
        hidden=not sys.stderr.isatty(),
        item_show_func=lambda text: text,
    )
    start = time.monotonic()
    done = [0, 0]

    def on_done(outcome: Outcome) -> None:
        done[0] += 1
        done[1] += outcome.obj.size
        rate = done[1] / max(time.monotonic() - start, 1e-6)
        bar.update(outcome.obj.size, f"{done[0]}/{len(objects)} objects, {_human(rate)}/s")

    with bar:  # restores the terminal's cursor on every path
        yield on_done


@main.command()
@click.argument("etl_class", metavar="ETL_CLASS")
@click.option(
    "--src",
    required=True,
    type=click.Path(exists=True, file_okay=False, readable=True, resolve_path=True),
    help="Directory of source objects (every file below it, recursively).",
)
@click.option(
    "--dst",
    required=True,
    type=click.Path(file_okay=False, writable=True, resolve_path=True),
    help="Directory the transformed objects are written to (created if missing).",
)
@click.option(
    "--comm",
    type=click.Choice(["hpush", "hpull", "ws"]),
    default="hpush",
    show_default=True,
    help="Communication type, as in the ETL spec.",
)
@click.option(
    "--fqn/--no-fqn",
    default=True,
    show_default=True,
    help="Send etl_fqn (the local path, AIS's default) or the object bytes.",
)
@click.option(
    "--direct-put",
    is_flag=True,
    help="Send Ais-Node-Url so the ETL PUTs each result to the stand-in target itself.",
)
@click.option("--etl-args", default="", help="etl_args passed with every object.")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 256),
    default=4,
    show_default=True,
    help="Objects in flight at once (threads, one connection each).",
)
@setting_options(RUN_SETTINGS)
def run(
    etl_class: str,
    src: str,
    dst: str,
    comm: str,
    fqn: bool,
    direct_put: bool,
    etl_args: str,
    jobs: int,
    **options: Any,
) -> None:
    """Transform every file of --src into --dst through ETL_CLASS, on this machine.

    Starts the real server (gunicorn, gevent workers) on 127.0.0.1 and a stand-in for the AIS
    target that sends each object as AIS would and receives direct puts. Exits 1 if any object
    failed, listing each failure.
    """
    from pathlib import Path

    from etl_wsgi import localrun

    src_dir, dst_dir = Path(src), Path(dst)
    if dst_dir == src_dir or src_dir in dst_dir.parents:
        raise click.BadParameter("must not be --src or inside it", param_hint="--dst")
    load_etl_class(etl_class)
    environ = {**os.environ, **setting_env(options)}
    workers = settings_from(environ, require_target=False).workers
    job = localrun.Job(src_dir, dst_dir, comm, fqn, direct_put, etl_args.strip(), jobs)
    objects = localrun.list_objects(src_dir)
    # SIGTERM (``timeout``, a CI runner) unwinds like Ctrl-C, so the server is stopped too.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with (
            localrun.running(job, etl_class, workers, environ) as server,
            progress(f"{comm} {etl_class}", objects) as on_done,
        ):
            summary = server.transform(objects, on_done)
    except localrun.ServerStartError as exc:
        raise click.ClickException(
            f"the server did not start: {exc} (see `etl-wsgi check {etl_class}`)"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_summary(summary)
    if summary.failures:
        sys.exit(1)


# ---- check --------------------------------------------------------------------------------------


def effective_settings(
    settings: Settings, environ: Mapping[str, str], options: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """``(variable, value (where from))`` for every setting; secrets are hidden."""
    from etl_wsgi.protocol import redact_secret

    rows = []
    for f in dataclasses.fields(Settings):
        meta = f.metadata
        names = (meta["env"], *meta["aliases"])
        source = next((n for n in names if (environ.get(n) or "").strip()), None)
        if options.get(f.name) is not None:
            source = option_name(f.name)
        value = str(getattr(settings, f.name))
        if f.name == "authn_token" and value:
            value = "***"
        value = redact_secret(value, settings.ais_target_url) if value else "unset"
        rows.append((meta["env"], f"{value} ({'from ' + source if source else 'default'})"))
    return rows


@main.command()
@click.argument("etl_class", metavar="ETL_CLASS")
@setting_options(SERVE_SETTINGS)
def check(etl_class: str, **options: Any) -> None:
    """Validate every setting and ETL_CLASS; print what `etl-wsgi serve` would run."""
    from etl_wsgi.gunicorn_hooks import config_values

    environ = {**os.environ, **setting_env(options)}
    settings = settings_from(environ, require_target=True)
    cls = load_etl_class(etl_class)
    etl = _instantiate(cls, environ)
    try:
        mode = "streaming (transform_stream)" if etl.use_streaming else "buffered (transform)"
    finally:
        etl.session.close()
    gunicorn = config_values(environ)
    lines = [
        ("class", f"{cls.__module__}.{cls.__qualname__}: {mode}"),
        ("transports", "hpush PUT /<path>, hpull GET /<path>, ws /ws: all served"),
        ("buffered transforms", f"{settings.transform_executor} executor"),
        ("etl_fqn input", "path (str)" if settings.direct_fqn else "bytes"),
        ("direct put retries", str(settings.direct_put_retries)),
        ("ws", f"max message {settings.ws_max_message} B, prefetch {settings.ws_prefetch}"),
        ("gunicorn bind", ", ".join(gunicorn["bind"])),
        ("gunicorn workers", f"{gunicorn['workers']} x {gunicorn['worker_class']}"),
        ("worker connections", str(gunicorn["worker_connections"])),
        (
            "timeouts",
            f"worker {gunicorn['timeout']}s, graceful {gunicorn['graceful_timeout']}s,"
            f" keep-alive {gunicorn['keepalive']}s",
        ),
    ]
    click.echo("etl-wsgi serve would run:")
    for key, value in lines:
        click.echo(f"  {key:<20} {value}")
    click.echo("settings:")
    for env, value in effective_settings(settings, environ, options):
        click.echo(f"  {env:<24} {value}")


def _instantiate(cls: type[ETLServer], environ: Mapping[str, str]) -> ETLServer:
    """Construct the ETL with ``environ`` as its settings (it reads ``os.environ`` itself)."""
    saved = dict(os.environ)
    os.environ.update(environ)
    try:
        return cls()
    except Exception as exc:  # the user's __init__ may raise anything: one line, no traceback
        raise click.ClickException(f"{cls.__qualname__}(): {type(exc).__name__}: {exc}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)
