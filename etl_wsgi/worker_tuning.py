"""Three per-request costs of gunicorn's request parsing, cut in every worker (issue 4).

Installed by the ``post_worker_init`` hook (:func:`install`), once the worker's configuration is
final; what gunicorn decides stays the same:

* **Settings as plain attributes** (:func:`freeze_config`).  gunicorn's ``Config`` answers
  every ``cfg.<setting>`` through ``__getattr__`` and the setting's ``get()``; parsing one
  request reads a dozen of them (header limits, forwarding policy, header map...): 3% of a
  worker at 1 KiB hpush (py-spy).  The worker never changes its settings after start-up, so
  each value is stored once on the worker's ``Config`` itself, where attribute lookup finds it
  first.  Names that ``Config`` defines itself (properties such as ``is_ssl``) keep theirs.
* **The peer's trust verdict, remembered** (:func:`ip_in_allow_list`).  For every request
  gunicorn parses the peer's address with :mod:`ipaddress` and matches it against
  ``forwarded_allow_ips`` (may the peer set ``X-Forwarded-*``?): 2.5% of a worker.  A pod's
  peers are its target and a few probes, and the allow lists are fixed, so the verdict per
  (address, list) is kept.
* **The base environ built once** (:func:`base_environ`).  For every request gunicorn builds
  its ``wsgi.errors`` (a ``WSGIErrorsWrapper``), whose ``__init__`` calls ``logging.
  getLogger``: the logging module's lock, a gevent lock in a patched worker.  The worker's
  requests now share one :class:`ErrorsStream`, and each gets a copy of a base environ made
  once: 2.5-3.7 us -> 0.14 us per request in a patched process.  It was 2% of a worker's
  samples at hpush md5 64 KiB, 256 connections (py-spy); wrk A/B runs saw it within noise.

All rely on gunicorn 27 internals (``Config.settings``, ``gunicorn.http.message.
_ip_in_allow_list``, ``gunicorn.http.wsgi.base_environ``); without them :func:`install` leaves
gunicorn as it is.
"""

from __future__ import annotations

from typing import Any

from gunicorn.http import message as gunicorn_message
from gunicorn.http import wsgi as gunicorn_wsgi

#: gunicorn's own ``_ip_in_allow_list``, called on a miss.
_original_ip_in_allow_list: Any = None
#: (address, id of the allow list, id of its networks) -> (verdict, the list, its networks):
#: the objects are kept so that their ids cannot be reused by other lists.
_verdicts: dict[tuple[str, int, int], tuple[bool, object, object]] = {}
#: Distinct keys kept at most (then the cache starts over): a pod sees a handful of peers.
MAX_VERDICTS = 1024


#: gunicorn's own ``base_environ``, for any configuration but the worker's.
_original_base_environ: Any = None
#: The worker's configuration and its base environ (with one :class:`ErrorsStream`).
_worker_cfg: Any = None
_template: dict[str, Any] = {}


class ErrorsStream(gunicorn_wsgi.WSGIErrorsWrapper):  # type: ignore[misc]
    """``wsgi.errors`` shared by a worker's requests: gunicorn's wrapper, streams looked up late.

    gunicorn's ``__init__`` lists the error log's streams; here that list is made when
    something is written (rarely: Flask's ``app.logger`` writes here during a request), so a
    log file reopened on ``USR1`` is the one written to.
    """

    def __init__(self, cfg: Any) -> None:  # not gunicorn's: its lookup is what is deferred
        self._cfg = cfg

    @property
    def streams(self) -> list[Any]:
        return gunicorn_wsgi.WSGIErrorsWrapper(self._cfg).streams  # type: ignore[no-any-return]

    def close(self) -> None:
        """Not closed by one request: the worker's other requests write here too."""


def base_environ(cfg: Any) -> dict[str, Any]:
    """gunicorn's ``base_environ``: for the worker's configuration, a copy of one made once."""
    if cfg is _worker_cfg:
        return _template.copy()
    return _original_base_environ(cfg)  # type: ignore[no-any-return]


def freeze_config(cfg: Any) -> int:
    """Store every setting's current value as a plain attribute of ``cfg``; how many were."""
    settings = getattr(cfg, "settings", None)
    if not isinstance(settings, dict):
        return 0
    own = type(cfg)
    stored = 0
    for name, setting in settings.items():
        if hasattr(own, name):  # Config's own property or method: it keeps the say
            continue
        object.__setattr__(cfg, name, setting.get())
        stored += 1
    return stored


def ip_in_allow_list(ip_str: str, allow_list: Any, networks: Any) -> bool:
    """gunicorn's ``_ip_in_allow_list``, its verdict kept per (address, allow list)."""
    key = (ip_str, id(allow_list), id(networks))
    hit = _verdicts.get(key)
    if hit is not None:
        return hit[0]
    verdict = bool(_original_ip_in_allow_list(ip_str, allow_list, networks))
    if len(_verdicts) >= MAX_VERDICTS:
        _verdicts.clear()
    _verdicts[key] = (verdict, allow_list, networks)
    return verdict


def _route(module: Any, name: str, ours: Any, original: Any) -> Any:
    """Put ``ours`` in place of ``module.<name>``; returns gunicorn's own (``original`` when
    ``ours`` is already there, or when gunicorn has no such name: then nothing changes)."""
    current = getattr(module, name, None)
    if current is None or current is ours:
        return original
    setattr(module, name, ours)
    return current


def install(cfg: Any) -> None:
    """Freeze ``cfg`` (the worker's), route gunicorn's peer check through the cache and build
    the worker's base environ (idempotent)."""
    global _original_ip_in_allow_list, _original_base_environ, _worker_cfg, _template
    freeze_config(cfg)
    _original_base_environ = _route(
        gunicorn_wsgi, "base_environ", base_environ, _original_base_environ
    )
    if _original_base_environ is not None:
        template = _original_base_environ(cfg)
        template["wsgi.errors"] = ErrorsStream(cfg)
        _worker_cfg, _template = cfg, template
    _original_ip_in_allow_list = _route(
        gunicorn_message, "_ip_in_allow_list", ip_in_allow_list, _original_ip_in_allow_list
    )
