"""Two per-request costs of gunicorn's request parsing, cut in every worker (issue 4).

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

Both rely on gunicorn 27 internals (``Config.settings``, ``gunicorn.http.message.
_ip_in_allow_list``); without them :func:`install` leaves gunicorn as it is.
"""

from __future__ import annotations

from typing import Any

#: gunicorn's own ``_ip_in_allow_list``, called on a miss.
_original_ip_in_allow_list: Any = None
#: (address, id of the allow list, id of its networks) -> (verdict, the list, its networks):
#: the objects are kept so that their ids cannot be reused by other lists.
_verdicts: dict[tuple[str, int, int], tuple[bool, object, object]] = {}
#: Distinct keys kept at most (then the cache starts over): a pod sees a handful of peers.
MAX_VERDICTS = 1024


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


def install(cfg: Any) -> None:
    """Freeze ``cfg`` (the worker's) and route gunicorn's peer check through the cache
    (idempotent)."""
    global _original_ip_in_allow_list
    from gunicorn.http import message

    freeze_config(cfg)
    current = getattr(message, "_ip_in_allow_list", None)
    if current is not None and current is not ip_in_allow_list:
        _original_ip_in_allow_list = current
        message._ip_in_allow_list = ip_in_allow_list
