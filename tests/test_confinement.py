"""Opt-in confinement (etl_wsgi/confine.py): ``ETL_FQN_ROOTS`` and ``ETL_ALLOWED_DESTINATIONS``.

Unit tests of the two policies and their settings, then end-to-end over a real
``gunicorn -k gevent``: an ``etl_fqn`` outside every root (directly, through a symlink, through
``..``) answers 403 (PROTOCOL.md §3); a pipeline hop outside the allow-list answers 403 before the
input is read or the transform runs, and nothing reaches that host (§4.1); the same over
WebSocket (§6), where the refusal closes the connection with 1011.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from etl_wsgi.config import ConfigError, Settings
from etl_wsgi.confine import Destinations, FqnRoots
from etl_wsgi.errors import DestinationNotAllowedError, FqnNotAllowedError
from etl_wsgi.protocol import Pipeline, parse_pipeline
from etl_wsgi.sources import FileSource
from tests.conftest import GunicornServer
from tests.e2e_support import booted, connect, request
from tests.fake_target import SECRET_PATH, FakeTarget, Reply
from tests.test_e2e_ws import OP_BINARY, OP_TEXT, expect_close, recv, send_task, ws_connect
from tests.unit_support import TARGET_URL, dst, fqn_query, path_escape, write_object

CLOSE_INTERNAL_ERROR = 1011


# ---- FqnRoots ----------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root/`` with ``in.txt``, ``outside/secret.txt`` next to it, symlinks in ``root/``."""
    write_object(tmp_path / "root" / "@ais" / "b" / "in.txt", b"inside")
    write_object(tmp_path / "outside" / "secret.txt", b"secret")
    write_object(tmp_path / "root10" / "x.txt", b"prefix")  # shares root's name as a prefix
    (tmp_path / "root" / "escape").symlink_to(tmp_path / "outside" / "secret.txt")
    (tmp_path / "root" / "alias").symlink_to(tmp_path / "root" / "@ais" / "b" / "in.txt")
    return tmp_path


def test_roots_parse_resolves_and_requires_directories(tree: Path) -> None:
    (tree / "link-to-root").symlink_to(tree / "root")
    roots = FqnRoots.parse(f" {tree / 'link-to-root'} , {tree / 'outside'},")
    assert roots.roots == (str(tree / "root"), str(tree / "outside"))
    assert str(roots) == f"{tree / 'root'},{tree / 'outside'}"
    assert not FqnRoots.parse(" , ")
    for bad in ("relative/dir", str(tree / "missing"), str(tree / "outside" / "secret.txt")):
        with pytest.raises(ValueError):
            FqnRoots.parse(bad)


def test_bad_root_is_a_startup_error_naming_the_setting(tree: Path) -> None:
    with pytest.raises(ConfigError, match="ETL_FQN_ROOTS"):
        Settings.from_env({"AIS_TARGET_URL": TARGET_URL, "ETL_FQN_ROOTS": str(tree / "missing")})


@pytest.mark.parametrize(
    ("relative", "allowed"),
    [
        ("root/@ais/b/in.txt", True),
        ("root/@ais/b/missing.txt", True),  # inside: the open answers 404 later
        ("root/alias", True),  # a symlink that stays inside
        ("root", True),  # the root itself
        ("outside/secret.txt", False),
        ("root/escape", False),  # a symlink out of the root
        ("root/../outside/secret.txt", False),
        ("root10/x.txt", False),  # a sibling whose name starts with the root's
        ("root/missing/../../outside/secret.txt", False),
    ],
)
def test_resolve(tree: Path, relative: str, allowed: bool) -> None:
    roots = FqnRoots((str(tree / "root"),))
    path = os.path.normpath(tree / relative)
    if allowed:
        assert roots.resolve(path, "obj") == os.path.realpath(path)
    else:
        with pytest.raises(FqnNotAllowedError, match="outside the allowed FQN roots") as info:
            roots.resolve(path, "obj")
        assert info.value.status == 403


def test_file_source_uses_the_checked_path(tree: Path) -> None:
    roots = FqnRoots((str(tree / "root"),))
    alias = FileSource(path_escape(tree / "root" / "alias"), "obj", roots)
    assert alias.check() == str(tree / "root" / "@ais" / "b" / "in.txt")  # ETL_DIRECT_FQN
    assert alias.size_hint() == len(b"inside")
    with alias.open() as reader:
        assert reader.read() == b"inside"
    escape = FileSource(path_escape(tree / "root" / "escape"), "obj", roots)
    assert escape.size_hint() is None  # no size of a file outside the roots either
    for access in (escape.check, escape.open):
        with pytest.raises(FqnNotAllowedError):
            access()


def test_no_roots_is_unrestricted() -> None:
    assert FqnRoots().resolve("/etc/passwd", "obj") == "/etc/passwd"


# ---- Destinations ------------------------------------------------------------------------------


def test_destinations_parse() -> None:
    allowed = Destinations.parse("Node-1.Example:8080, 10.1.0.0/16 ,[::1]:9000,node2, 192.0.2.7")
    assert str(allowed) == "node-1.example:8080,[::1]:9000,node2,192.0.2.7,10.1.0.0/16"
    assert not Destinations.parse("")
    for bad in ("host:port", "http://h:1", "h/x/y", "10.0.0.0/99", "h:99999", "u@h"):
        with pytest.raises(ValueError):
            Destinations.parse(bad)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://node-1.example:8080", True),
        ("http://NODE-1.example.:8080/ais%2Fx?owt=1", True),
        ("http://node-1.example:8081", False),  # port given: only that one
        ("http://node2:1", True),  # no port given: any
        ("https://node2", True),
        ("http://10.1.200.3:31000", True),  # CIDR, any port
        ("http://10.2.0.1:31000", False),
        ("http://[::1]:9000", True),
        ("http://[0:0::1]:9000", True),  # same address, other spelling
        ("http://[::1]:9001", False),
        ("https://192.0.2.7", True),
        ("http://10.0.0.1:9080/dst", True),  # AIS_TARGET_URL's host:port: always allowed
        ("http://10.0.0.1:9081", False),
        ("http://evil.example", False),
        ("http://10.1.0.0.evil.example", False),  # a name, not an address in the network
    ],
)
def test_destinations_allows(url: str, allowed: bool) -> None:
    policy = Destinations.parse("node-1.example:8080,node2,10.1.0.0/16,[::1]:9000,192.0.2.7")
    assert policy.allows(url, TARGET_URL) is allowed


def test_empty_destinations_allow_anything() -> None:
    assert Destinations().allows("http://evil.example:1", TARGET_URL)


def test_pipeline_hops_are_every_entry_in_order() -> None:
    pipeline = parse_pipeline(" http://a:1 , http://b:2/x?owt=1 ,http://c ")
    assert pipeline is not None
    assert pipeline.hops == ["http://a:1", "http://b:2/x?owt=1", "http://c"]
    assert parse_pipeline("http://a:1") == Pipeline("http://a:1")
    assert Pipeline("http://a:1").hops == ["http://a:1"]


def test_check_names_the_first_disallowed_hop() -> None:
    policy = Destinations.parse("stage:8000")
    policy.check(["http://stage:8000", "http://10.0.0.1:9080/x"], TARGET_URL)
    with pytest.raises(DestinationNotAllowedError, match="'evil:80' is not allowed") as info:
        policy.check(["http://stage:8000", "http://evil/dst?owt=1"], TARGET_URL)
    assert info.value.status == 403


# ---- end to end: HTTP --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("confine")
    write_object(base / "mp1" / "@ais" / "src" / "%ob" / "hello.txt", b"hello")
    write_object(base / "outside" / "secret.txt", b"secret")
    (base / "mp1" / "escape").symlink_to(base / "outside" / "secret.txt")
    return base


@pytest.fixture(scope="module")
def evil() -> Iterator[FakeTarget]:
    """A host the allow-list does not name: it must never see a request."""
    with FakeTarget() as fake:
        yield fake


@pytest.fixture(scope="module")
def stage() -> Iterator[FakeTarget]:
    """An allowed next stage (named by port in ``ETL_ALLOWED_DESTINATIONS``)."""
    with FakeTarget() as fake:
        yield fake


@pytest.fixture(scope="module")
def confined(module_target: FakeTarget, roots: Path, stage: FakeTarget) -> Iterator[GunicornServer]:
    """``Upper`` with both policies on; ``module_target`` (AIS_TARGET_URL) is allowed implicitly."""
    env = {
        "ETL_FQN_ROOTS": str(roots / "mp1"),
        "ETL_ALLOWED_DESTINATIONS": f"127.0.0.1:{stage.port}",
    }
    with booted("transformers:Upper", module_target, **env) as server:
        yield server


@pytest.fixture
def clean(target: FakeTarget, evil: FakeTarget, stage: FakeTarget) -> FakeTarget:
    """Reset the shared fakes; returns the AIS target."""
    evil.reset()
    stage.reset()
    return target


def fqn_put(server: GunicornServer, fs_path: str | Path) -> tuple[int, bytes]:
    status, _headers, body = request(server, "PUT", f"/src/hello.txt?etl_fqn={fqn_query(fs_path)}")
    return status, body


def test_fqn_inside_root_is_read(confined: GunicornServer, roots: Path) -> None:
    assert fqn_put(confined, roots / "mp1/@ais/src/%ob/hello.txt") == (200, b"HELLO")


def test_policies_are_logged_at_startup(
    confined: GunicornServer, roots: Path, stage: FakeTarget
) -> None:
    line = f"ETL_FQN_ROOTS={roots / 'mp1'}, ETL_ALLOWED_DESTINATIONS=127.0.0.1:{stage.port}, "
    assert line + "serving HTTP" in confined.log()


def test_missing_fqn_inside_root_is_still_404(confined: GunicornServer, roots: Path) -> None:
    status, body = fqn_put(confined, roots / "mp1/@ais/src/%ob/nope.txt")
    assert status == 404, body


@pytest.mark.parametrize(
    "relative", ["outside/secret.txt", "mp1/escape", "mp1/@ais/../../outside/secret.txt"]
)
def test_fqn_outside_root_is_403(confined: GunicornServer, roots: Path, relative: str) -> None:
    # the '..' form is sent as is: the server's own normalization must not let it out
    status, body = fqn_put(confined, f"{roots}/{relative}")
    assert status == 403, body
    message = json.loads(body)["error"]
    assert "outside the allowed FQN roots (ETL_FQN_ROOTS)" in message
    assert "secret" not in message.replace("secret.txt", "")  # the file's bytes never show


def hop_put(server: GunicornServer, node_url: str, body: bytes = b"hello") -> tuple[int, bytes]:
    status, _headers, reply = request(server, "PUT", "/src/a.txt", body, {"Ais-Node-Url": node_url})
    return status, reply


def test_disallowed_destination_is_403_and_nothing_is_sent(
    confined: GunicornServer, clean: FakeTarget, evil: FakeTarget
) -> None:
    # b"boom" makes Upper raise: a 403 (not 500) shows the transform never ran
    status, body = hop_put(confined, dst(evil), b"boom")
    assert status == 403, body
    assert f"'127.0.0.1:{evil.port}' is not allowed" in json.loads(body)["error"]
    assert evil.requests == []


def test_refused_body_is_skipped_on_a_kept_alive_connection(
    confined: GunicornServer, clean: FakeTarget, evil: FakeTarget
) -> None:
    conn = connect(confined)
    try:
        conn.request("PUT", "/src/a.txt", body=b"x" * 100_000, headers={"Ais-Node-Url": evil.url})
        resp = conn.getresponse()
        assert (resp.status, resp.read()[:11]) == (403, b'{"error": "')
        conn.request("PUT", "/src/b.txt", body=b"next")  # same connection: not desynchronised
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"NEXT")
    finally:
        conn.close()
    assert evil.requests == []


def test_disallowed_later_hop_is_403_before_the_first_is_contacted(
    confined: GunicornServer, clean: FakeTarget, evil: FakeTarget, stage: FakeTarget
) -> None:
    status, body = hop_put(confined, f"{stage.url},{dst(evil)}")
    assert status == 403, body
    assert stage.requests == [] and evil.requests == []


def test_hpull_with_disallowed_destination_reads_nothing(
    confined: GunicornServer, clean: FakeTarget, evil: FakeTarget
) -> None:
    clean.objects[SECRET_PATH + "/src%2Fa.txt"] = b"hello"
    headers = {"Ais-Node-Url": evil.url}
    status, _headers, body = request(confined, "GET", "/src/a.txt", None, headers)
    assert status == 403, body
    assert clean.requests == [] and evil.requests == []


def test_allowed_stage_and_implicit_target_work(
    confined: GunicornServer, clean: FakeTarget, stage: FakeTarget
) -> None:
    stage.default = Reply(204, headers={"Ais-Direct-Put-Length": "5"})
    assert hop_put(confined, f"{stage.url},{dst(clean)}") == (204, b"")
    assert [r.body for r in stage.puts] == [b"HELLO"]
    assert hop_put(confined, dst(clean)) == (204, b"")  # AIS_TARGET_URL's host:port
    assert [r.body for r in clean.puts] == [b"HELLO"]


# ---- end to end: WebSocket ---------------------------------------------------------------------


def test_ws_allowed_pipeline_and_root(
    confined: GunicornServer, clean: FakeTarget, roots: Path
) -> None:
    fqn = path_escape(roots / "mp1/@ais/src/%ob/hello.txt")
    with ws_connect(confined) as ws:
        send_task(ws, {"path": "a", "fqn": fqn}, None)
        assert recv(ws) == (OP_BINARY, b"HELLO")
        send_task(ws, {"path": "a", "pipeline": dst(clean)}, b"hello")
        assert recv(ws) == (OP_TEXT, b"5")
    assert [r.body for r in clean.puts] == [b"HELLO"]


def test_ws_disallowed_pipeline_closes_1011_and_sends_nothing(
    confined: GunicornServer, clean: FakeTarget, evil: FakeTarget
) -> None:
    with ws_connect(confined) as ws:
        send_task(ws, {"path": "a", "pipeline": dst(evil)}, b"boom")
        code, reason = expect_close(ws)
    assert code == CLOSE_INTERNAL_ERROR
    assert "is not allowed" in reason
    assert evil.requests == []


@pytest.mark.parametrize("relative", ["outside/secret.txt", "mp1/escape"])
def test_ws_fqn_outside_root_closes_1011(
    confined: GunicornServer, roots: Path, relative: str
) -> None:
    with ws_connect(confined) as ws:
        send_task(ws, {"path": "a", "fqn": path_escape(roots / relative)}, None)
        code, reason = expect_close(ws)
    assert code == CLOSE_INTERNAL_ERROR
    assert "outside the allowed FQN roots" in reason


def test_bad_root_stops_gunicorn_at_startup(module_target: FakeTarget, tmp_path: Path) -> None:
    server = GunicornServer(
        "transformers:Upper",
        {
            "AIS_TARGET_URL": module_target.url + SECRET_PATH,
            "ETL_FQN_ROOTS": str(tmp_path / "missing"),
        },
    )
    try:
        with pytest.raises(RuntimeError, match="ETL_FQN_ROOTS") as info:
            server.start()
    finally:
        server.stop()
    assert "is not an existing directory" in str(info.value)
