"""Worker stop notification: long-lived work (WebSocket sessions) ends itself on SIGTERM.

gunicorn's worker only flips ``alive`` on SIGTERM and then waits up to the graceful timeout for
open connections; an idle WebSocket connection would hold the worker for all of it and then be
cut without a close frame. The ``post_worker_init`` hook (:mod:`etl_wsgi.gunicorn_hooks`) calls
:func:`notify_stop`; registered callbacks close what is idle and let busy work finish.

Pure module: standard library only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_callbacks: list[Callable[[], None]] = []
_stopping = threading.Event()


def on_stop(callback: Callable[[], None]) -> None:
    """Run ``callback`` (once, in its own thread/greenlet) when the worker is told to stop."""
    _callbacks.append(callback)


def stopping() -> bool:
    """True once the worker was told to stop."""
    return _stopping.is_set()


def notify_stop() -> None:
    """Mark the worker as stopping. Safe in a signal handler: it only sets an event.

    (Under gevent a signal handler runs in the event loop, where nothing may block, not even
    starting a thread; the watcher started by :func:`start_watcher` runs the callbacks.)
    """
    _stopping.set()


def start_watcher() -> None:
    """Start the daemon thread (a greenlet under gevent) that runs the callbacks on stop."""
    threading.Thread(target=_watch, name="etl-wsgi-stop-watcher", daemon=True).start()


def _watch() -> None:
    _stopping.wait()
    for callback in list(_callbacks):
        try:
            callback()
        except Exception:
            log.warning("stop callback %r failed", callback, exc_info=True)
