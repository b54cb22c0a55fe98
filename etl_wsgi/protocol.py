"""The AIS ETL wire protocol as pure functions: no I/O, no Flask, no requests.

* :class:`ParsedRequest` - one inbound request, read once by an adapter (PROTOCOL.md §2.4, §6.2).
* :func:`parse_pipeline` - the ``Ais-Node-Url`` header (PROTOCOL.md §4.1).
* :func:`compose_direct_put_url` - the outbound PUT URL (PROTOCOL.md §4.2).
* :func:`sanitize_fqn` - the ``etl_fqn`` second decode and normalization (PROTOCOL.md §3).
* :func:`upstream_object_url` - the GET back to the target for hpull (PROTOCOL.md §2.6).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from etl_wsgi.const import QPARAM_ETL_ARGS
from etl_wsgi.errors import InvalidPipelineError

#: Longest pipeline entry we accept; a real one is a host:port plus an escaped object name.
MAX_PIPELINE_ENTRY = 8192
_HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedRequest:
    """One inbound transform request, decoded once by the transport adapter.

    ``path`` is the percent-decoded object path without the leading ``/`` (PROTOCOL.md §2.5);
    ``fqn`` is the ``etl_fqn`` value after query decoding, still path-escaped (§3);
    ``node_url`` is the raw ``Ais-Node-Url`` header (§4.1); ``etl_args`` is stripped (§2.4).
    """

    method: str
    path: str
    etl_args: str = ""
    fqn: str = ""
    node_url: str = ""

    @property
    def is_get(self) -> bool:
        return self.method == "GET"


@dataclass(frozen=True)
class Pipeline:
    """Next hop and the rest of the chain, from ``Ais-Node-Url``."""

    first: str
    remaining: str = ""

    @property
    def hops(self) -> list[str]:
        """Every entry in order: the next hop, then the ones it is asked to forward to."""
        rest = [entry.strip() for entry in self.remaining.split(",")] if self.remaining else []
        return [self.first, *rest]


def parse_pipeline(header: str | None) -> Pipeline | None:
    """Parse ``Ais-Node-Url`` (PROTOCOL.md §4.1).

    Empty or blank -> ``None`` (no pipeline).  Otherwise trim, split on ``,``; an empty entry or
    an entry that is not an ``http(s)://host[:port]`` URL raises :class:`InvalidPipelineError`
    (400).  The remaining string is passed on exactly as received, trimmed.
    """
    if not header or not header.strip():
        return None
    header = header.strip()
    entries = [entry.strip() for entry in header.split(",")]
    for entry in entries:
        if not entry:
            raise InvalidPipelineError("Pipeline header contains empty entry")
        _check_hop(entry)
    first, _, remaining = header.partition(",")
    return Pipeline(first.strip(), remaining.strip())


def _check_hop(entry: str) -> None:
    if len(entry) > MAX_PIPELINE_ENTRY:
        raise InvalidPipelineError(f"Pipeline entry longer than {MAX_PIPELINE_ENTRY} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in entry):
        raise InvalidPipelineError(f"Pipeline entry {entry[:200]!r} contains whitespace")
    try:
        parts = urlsplit(entry)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise InvalidPipelineError(f"Pipeline entry {entry[:200]!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidPipelineError(
            f"Pipeline entry {entry[:200]!r} is not an http:// or https:// URL with a host"
        )
    if "[" not in parts.netloc and not _is_host_name(parts.hostname):
        raise InvalidPipelineError(f"Pipeline entry {entry[:200]!r} has an invalid host name")


def _is_host_name(host: str) -> bool:
    """An IPv4 address or DNS name: labels of 1-63 ``[a-z0-9_-]`` characters (RFC 1123).

    Stricter than ``urlsplit``: a percent-encoded host (``%41``) would be decoded and looked up
    by the HTTP client, and an empty or over-long label makes it raise instead of connecting.
    (IPv6 literals in brackets are validated by ``urlsplit`` itself.)
    """
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def is_stage_hop(hop: str) -> bool:
    """A hop without a path is another ETL stage; with a path it is the destination target."""
    return urlsplit(hop).path in ("", "/")


def compose_direct_put_url(hop: str, host_target: str, obj_path: str, etl_args: str = "") -> str:
    """Outbound PUT URL for ``hop`` (PROTOCOL.md §4.2).

    * destination target (hop has a path): path = ``AIS_TARGET_URL`` path + hop path, both kept
      escaped, so the destination validates the same per-ETL secret; scheme of ``AIS_TARGET_URL``
      (the target's intra-data scheme, as the SDK does);
    * next ETL stage (no path): path = the object path, escaped except ``/`` and ``@``; the
      stage is contacted with its **own** scheme (fixes PROTOCOL.md §9.2 #16);
    * query: the hop's own (``uuid``, ``owt``) kept; ``etl_args`` replaces any existing one when
      non-empty; ``etl_fqn`` is never added.
    """
    target = urlsplit(host_target)
    dest = urlsplit(hop)
    if is_stage_hop(hop):
        scheme = dest.scheme
        path = "/" + quote(obj_path, safe="/@")
    else:
        scheme = target.scheme
        path = target.path.rstrip("/") + dest.path
    query = dest.query
    if etl_args:
        pairs = [
            (k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != QPARAM_ETL_ARGS
        ]
        pairs.append((QPARAM_ETL_ARGS, etl_args))
        query = urlencode(pairs)
    return urlunsplit((scheme, dest.netloc, path, query, ""))


def sanitize_fqn(fqn: str) -> str:
    """Second percent-decode of ``etl_fqn`` and normalization to an absolute path (PROTOCOL.md §3).

    ``unquote`` (not ``unquote_plus``): the target path-escapes the FQN before query-encoding it.
    Normalization only: ``..`` collapses at ``/``; confinement is a separate, opt-in check.
    """
    return posixpath.normpath(os.path.join("/", unquote(fqn).lstrip("/")))


def upstream_object_url(host_target: str, path: str) -> str:
    """hpull GET back to the target: all but ``@`` escaped, ``/`` and ``#`` included (§2.6)."""
    return f"{host_target.rstrip('/')}/{quote(path, safe='@')}"


def redact_secret(text: str, host_target: str, token: str = "") -> str:
    """Hide the per-ETL secret (last path segment of ``AIS_TARGET_URL``) and the
    ``AIS_AUTHN_TOKEN`` in messages sent back and in logs."""
    secret = urlsplit(host_target).path.rstrip("/").rpartition("/")[2]
    for hidden in (token, secret):
        # too short to be a secret: replacing it would garble messages
        if len(hidden) >= 4:
            text = text.replace(hidden, "***")
    return text
