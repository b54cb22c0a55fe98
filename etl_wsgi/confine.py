"""Opt-in confinement: which files an ``etl_fqn`` may name, which hosts a pipeline may reach.

Both policies are off by default (compatibility with the SDK servers, PROTOCOL.md §3, §4.1):

* :class:`FqnRoots` (``ETL_FQN_ROOTS``): an ``etl_fqn`` is resolved (symlinks and ``..``,
  :func:`os.path.realpath`) and must lie under one of the root directories, else ``403``.  The
  target's mountpaths, mounted read-only at the same paths in the pod (§1.1), are the natural
  roots.
* :class:`Destinations` (``ETL_ALLOWED_DESTINATIONS``): every hop of ``Ais-Node-Url`` must name an
  allowed host, else ``403`` before the input is read or the transform runs, so a pod reachable
  by others is not an open relay (§4.1, §4.2).  Every hop is checked, not only the one we PUT
  to: the rest of the chain is forwarded, and a next stage without this check would relay it.

Pure module: standard library and :mod:`etl_wsgi.errors` only (the gunicorn master parses these).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from etl_wsgi.errors import DestinationNotAllowedError, FqnNotAllowedError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_PORTS = {"http": 80, "https": 443}


def split_list(raw: str) -> list[str]:
    """Comma-separated entries, trimmed; empty entries dropped."""
    return [entry.strip() for entry in raw.split(",") if entry.strip()]


# --- FQN roots ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FqnRoots:
    """Resolved root directories; empty means unrestricted."""

    roots: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: str) -> FqnRoots:
        """``/ais/mp1,/ais/mp2``: each an existing directory, stored resolved (``realpath``)."""
        roots = []
        for entry in split_list(raw):
            if not os.path.isabs(entry):
                raise ValueError(f"{entry!r} is not an absolute path")
            if not os.path.isdir(entry):
                raise ValueError(f"{entry!r} is not an existing directory")
            roots.append(os.path.realpath(entry))
        return cls(tuple(roots))

    def __bool__(self) -> bool:
        return bool(self.roots)

    def __str__(self) -> str:
        return ",".join(self.roots)

    def resolve(self, fs_path: str, obj_path: str) -> str:
        """``fs_path`` with symlinks and ``..`` resolved; ``403`` if it is outside every root.

        A path that does not exist resolves as far as it exists (``realpath`` is not strict), so
        a missing file inside a root still answers ``404`` and one outside answers ``403``
        without telling whether it exists.  Unrestricted: ``fs_path`` unchanged.
        """
        if not self.roots:
            return fs_path
        try:
            real = os.path.realpath(fs_path)
        except (OSError, ValueError):  # NUL byte, symlink loop on old Pythons
            real = ""
        if real and any(_is_within(real, root) for root in self.roots):
            return real
        raise FqnNotAllowedError(
            f"Error processing object {obj_path!r}: {fs_path!r} is outside the allowed FQN roots "
            "(ETL_FQN_ROOTS)."
        )


def _is_within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


# --- destinations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostRule:
    """``host`` (any port) or ``host:port``; host names compare case-insensitively, unresolved."""

    host: str
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        return host == self.host and (self.port is None or port == self.port)


@dataclass(frozen=True)
class Destinations:
    """Allowed next hops; empty means unrestricted.  Entries: ``host``, ``host:port``,
    ``[v6addr]:port`` or a CIDR network such as ``10.0.0.0/8`` (IP literals only, any port)."""

    hosts: tuple[HostRule, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, raw: str) -> Destinations:
        hosts: list[HostRule] = []
        networks: list[IPNetwork] = []
        for entry in split_list(raw):
            if "/" in entry:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ValueError(f"{entry!r} is not a CIDR network") from None
            else:
                hosts.append(_host_rule(entry))
        return cls(tuple(hosts), tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)

    def __str__(self) -> str:
        hosts = [_netloc(r.host, r.port) if r.port else r.host for r in self.hosts]
        return ",".join([*hosts, *map(str, self.networks)])

    def allows(self, url: str, target_url: str = "") -> bool:
        """Whether ``url``'s host (and port) is allowed; ``target_url``'s host:port always is."""
        if not self:
            return True
        host, port = _host_port(url)
        if target_url and (host, port) == _host_port(target_url):
            return True
        if any(rule.matches(host, port) for rule in self.hosts):
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self.networks)

    def check(self, hops: list[str], target_url: str = "") -> None:
        """Raise ``403`` naming the first hop whose host is not allowed (PROTOCOL.md §4.1)."""
        for hop in hops:
            if not self.allows(hop, target_url):
                host, port = _host_port(hop)
                raise DestinationNotAllowedError(
                    f"Pipeline destination {_netloc(host, port)!r} is not allowed "
                    "(ETL_ALLOWED_DESTINATIONS)"
                )


def _host_rule(entry: str) -> HostRule:
    parts = urlsplit("//" + entry)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{entry!r} has a bad port") from None
    if not parts.hostname or parts.path or parts.query or parts.username:
        raise ValueError(f"{entry!r} is not host or host:port")
    return HostRule(_normal_host(parts.hostname), port)


def _normal_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))  # one spelling per address (::1, 0:0::1)
    except ValueError:
        return host.lower().rstrip(".")


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return _normal_host(parts.hostname or ""), parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)


def _netloc(host: str, port: int | None) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
