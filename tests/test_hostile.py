"""Hostile and malformed input: a clear 4xx (or a start-up error naming the setting), never a
5xx or a hang.

On the wire, against real gunicorn (buffered ``Upper`` and streaming ``UpperStream``):
malformed ``Ais-Node-Url`` (PROTOCOL.md §4.1), bad percent-encoding and invalid UTF-8 in paths
and ``etl_fqn`` (§2.4, §3), traversal in ``etl_fqn``, FQNs that are not regular files, broken
chunked framing, oversized request lines and headers, and a hypothesis property: random
``Ais-Node-Url`` values never get a 5xx.  Requests are written on raw sockets, byte for byte.

gunicorn answers some input itself, before the application, with an HTML page (statuses
checked here and listed in the README): a request line over 8190 bytes ``414``, a header field
over 8190 bytes or more than 100 headers ``431``, a NUL or non-token byte in a header, a bad
``Content-Length``, ``Content-Length`` together with ``Transfer-Encoding``, or a request line
that is not HTTP ``400``.

Settings: every one, given garbage, is parsed or refused with :class:`ConfigError` naming it
(hypothesis over all declared settings); the start-up path that turns that into one clear log
line and a non-zero exit is tests/test_e2e_gunicorn.py::test_bad_setting_fails_start_up.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from etl_wsgi.config import ConfigError, Settings
from etl_wsgi.errors import InvalidPipelineError
from etl_wsgi.protocol import parse_pipeline
from tests.conftest import GunicornServer
from tests.e2e_support import booted_many, send_raw, split_reply
from tests.fake_target import FakeTarget
from tests.test_e2e_ws import expect_close, ws_connect
from tests.unit_support import DST_PATH, fqn_query


@pytest.fixture(scope="module")
def servers(module_target: FakeTarget) -> Iterator[dict[bool, GunicornServer]]:
    apps = {False: "transformers:Upper", True: "transformers:UpperStream"}
    with booted_many(apps, module_target, AIS_DIRECT_PUT_RETRIES="0") as booted:
        yield booted


@pytest.fixture(params=[False, True], ids=["buffered", "stream"])
def server(request: pytest.FixtureRequest, servers: dict[bool, GunicornServer]) -> GunicornServer:
    return servers[request.param]


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> str:
        assert self.headers.get("content-type") == "application/json", self
        return json.loads(self.body)["error"]


def exchange(server: GunicornServer, raw: bytes) -> Answer:
    """Send ``raw``, half-close, read the whole answer (a chunked body is decoded)."""
    status, headers, body = split_reply(send_raw(server, raw))
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return Answer(status, headers, body)


def dechunk(body: bytes) -> bytes:
    out = b""
    for _ in range(len(body)):  # bounded
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2 :]
    raise AssertionError("unterminated chunked body")


def put(target: bytes, headers: bytes = b"", body: bytes = b"hello") -> bytes:
    return (
        b"PUT " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


def node_url(value: bytes) -> bytes:
    return b"Ais-Node-Url: " + value + b"\r\n"


# ---- Ais-Node-Url (§4.1) -------------------------------------------------------------------------

BAD_NODE_URLS = {
    "empty-entry": (b"http://127.0.0.1:1,,http://127.0.0.1:2", "contains empty entry"),
    "only-commas": (b",,", "contains empty entry"),
    "ftp": (b"ftp://127.0.0.1/x", "is not an http:// or https:// URL"),
    "file": (b"file:///etc/passwd", "is not an http:// or https:// URL"),
    "javascript": (b"javascript:alert(1)", "is not an http:// or https:// URL"),
    "no-scheme": (b"127.0.0.1:8080", "is not an http:// or https:// URL"),
    "no-host": (b"http://:80/x", "is not an http:// or https:// URL"),
    "tab-inside": (b"http://127.0.0.1\t:1", "contains whitespace"),
    "space-inside": (b"http://127.0.0.1:1/a b", "contains whitespace"),
    "bad-port": (b"http://127.0.0.1:99999", "is not a URL"),
    "bad-ipv6": (b"http://[zz]:1/x", "is not a URL"),
    "empty-label": (b"http://a..b/x", "has an invalid host name"),
    "long-label": (b"http://" + b"a" * 64 + b"/x", "has an invalid host name"),
    "percent-host": (b"http://%41:1/x", "has an invalid host name"),
    "latin1-host": (b"http://\xe9t\xe9.example/x", "has an invalid host name"),
}


@pytest.mark.parametrize("case", list(BAD_NODE_URLS))
def test_malformed_node_url_is_400_and_nothing_is_sent(
    server: GunicornServer, target: FakeTarget, case: str
) -> None:
    value, message = BAD_NODE_URLS[case]
    answer = exchange(server, put(b"/src/a.txt", node_url(value)))
    assert answer.status == 400, answer
    assert answer.error().startswith("Invalid pipeline header: ")
    assert message in answer.error()
    assert target.requests == []


def test_node_url_with_nul_or_over_the_header_limit_is_refused_by_gunicorn(
    server: GunicornServer, target: FakeTarget
) -> None:
    nul = exchange(server, put(b"/src/a.txt", node_url(b"http://a\x00b:1/x")))
    long = exchange(server, put(b"/src/a.txt", node_url(b"http://127.0.0.1:1/" + b"a" * 9000)))
    assert (nul.status, long.status) == (400, 431)
    assert target.requests == []


# ---- gunicorn's own limits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (put(b"/" + b"a" * 9000), 414),  # request line over limit_request_line (8190)
        (put(b"/src/a", b"X-Big: " + b"a" * 9000 + b"\r\n"), 431),  # limit_request_field_size
        (put(b"/src/a", b"".join(b"X-%d: 1\r\n" % i for i in range(101))), 431),  # 100 fields
        (b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (
            b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            400,
        ),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),  # a TLS hello
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),  # HTTP/2 preface
        (put(b"/src/\xff\xfe"), 400),  # raw non-ASCII in the request line
        (b"POST /src/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    ],
    ids=[
        "request-line-9000",
        "header-9000",
        "101-headers",
        "content-length-abc",
        "content-length-negative",
        "content-length-and-chunked",
        "tls-hello",
        "http2-preface",
        "raw-bytes-in-path",
        "post",
    ],
)
def test_malformed_request_gets_gunicorns_4xx(
    server: GunicornServer, raw: bytes, status: int
) -> None:
    assert exchange(server, raw).status == status
    assert exchange(server, put(b"/src/a")).body == b"HELLO"  # the worker goes on


# ---- request bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize("size_line", [b"zz", b"-5", b"0x5", b"ffffffffffffffffffff"])
def test_broken_chunked_framing_is_400(server: GunicornServer, size_line: bytes) -> None:
    raw = (
        b"PUT /src/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + size_line
        + b"\r\nhello\r\n0\r\n\r\n"
    )
    answer = exchange(server, raw)
    assert answer.status == 400, answer
    assert answer.error().startswith("Request body could not be read: ")


def test_content_length_far_beyond_the_body_is_400(servers: dict[bool, GunicornServer]) -> None:
    """(Streaming, and direct puts: tests/test_faults.py, short bodies.)"""
    answer = exchange(
        servers[False],
        b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\nabc",
    )
    assert answer.status == 400, answer
    assert "ended after 3 of 99999999999999999999 bytes" in answer.error()


# ---- paths and etl_fqn (§2.4, §2.5, §3) --------------------------------------------------------


@pytest.mark.parametrize(
    "path", [b"/src/%zz", b"/src/%", b"/%ff%fe", b"/src/%00x", b"//x/y", b"/src/a?etl_args=%ff"]
)
def test_odd_paths_are_only_informational(server: GunicornServer, path: bytes) -> None:
    """The path is the object's name for the transform (§2.5); bad escapes do not matter."""
    answer = exchange(server, put(path))
    assert (answer.status, answer.body) == (200, b"HELLO")


def test_hpull_of_an_invalid_utf8_path_asks_the_target(
    servers: dict[bool, GunicornServer], target: FakeTarget
) -> None:
    answer = exchange(servers[False], b"GET /%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (answer.status, answer.error()) == (404, "Target request failed")
    (get,) = target.requests
    assert get.raw_path.endswith("/%EF%BF%BD%EF%BF%BD")  # U+FFFD, escaped again


@pytest.fixture
def mounted(tmp_path: Path) -> Path:
    """A target mount with one object, ``<tmp>/mp/@ais/src/%ob/a.txt`` = ``hello``."""
    obj = tmp_path / "mp" / "@ais" / "src" / "%ob" / "a.txt"
    obj.parent.mkdir(parents=True)
    obj.write_bytes(b"hello")
    return tmp_path / "mp"


def fqn_cases(mp: Path) -> dict[str, tuple[str, int, str]]:
    """``etl_fqn`` query value -> (status, text the error names)."""
    fifo = mp / "fifo"
    os.mkfifo(fifo)
    return {
        "bad-escape": ("%zz", 404, "'/%zz'"),
        "invalid-utf8": ("%ff%fe", 404, "'/\ufffd\ufffd'"),
        "invalid-utf8-twice-escaped": ("%25ff", 404, "'/\ufffd'"),
        "nul": ("%2500", 400, "embedded null byte"),
        "traversal-collapses": (
            fqn_query(f"{mp}/../../nonexistent"),
            404,
            f"'{mp.parent.parent / 'nonexistent'}'",
        ),
        "traversal-above-root": ("..%252F..%252F..%252Fnope", 404, "'/nope'"),
        "name-too-long": ("a" * 3000, 400, "File name too long"),
        "root": ("%252F", 404, "'/'"),
        "directory": (fqn_query(mp), 404, f"'{mp}'"),
        "fifo": (fqn_query(fifo), 404, f"'{fifo}'"),
        "device": (fqn_query("/dev/zero"), 404, "'/dev/zero'"),
        "proc-mem": (fqn_query("/proc/self/mem"), 400, "Input/output error"),
    }


def test_hostile_etl_fqn_is_a_clear_4xx(servers: dict[bool, GunicornServer], mounted: Path) -> None:
    """Never a 5xx, never a hang (a FIFO, /dev/zero), every message names the normalized path.

    Traversal is *normalized* (``..`` collapses at ``/``, §3); confining FQNs to the mounts is
    a separate setting.  ``/proc/self/mem`` fails on read, so only the buffered server reads it
    here (a streaming transform reads it itself).
    """
    for name, (value, status, text) in fqn_cases(mounted).items():
        for stream, server in servers.items():
            if name == "proc-mem" and stream:
                continue
            answer = exchange(server, put(f"/src/a?etl_fqn={value}".encode(), body=b""))
            assert (answer.status, text in answer.error()) == (status, True), (name, answer)
    obj = fqn_query(mounted / "@ais" / "src" / "%ob" / "a.txt")
    good = exchange(servers[True], put(f"/src/a?etl_fqn={obj}".encode(), body=b""))
    assert (good.status, good.body) == (200, b"HELLO")
    # each failure is one log line; none prints a traceback (FQN reads run in a thread pool)
    assert "Traceback" not in servers[False].log()


# ---- ws control messages (§6.2) ------------------------------------------------------------------

WS_CONTROLS = {
    "invalid-utf8": ([b"\xff\xfe"], "control message is not JSON"),
    "json-array": ([b"[1, 2]"], "control message is not a JSON object"),
    "json-null": ([b"null"], "control message is not a JSON object"),
    "pipeline-bad-host": (
        [b'{"pipeline": "http://a..b/x", "path": "p"}', b"data"],
        "has an invalid host name",
    ),
    "pipeline-not-a-string": ([b'{"pipeline": ["a"], "path": "p"}', b"data"], "is not an http"),
    "fqn-nul": ([b'{"fqn": "%00", "path": "p"}'], "embedded null byte"),
}


@pytest.mark.parametrize("case", list(WS_CONTROLS))
def test_hostile_ws_control_closes_1011(servers: dict[bool, GunicornServer], case: str) -> None:
    """Never a success frame, never a hang: the connection is closed with the reason."""
    messages, reason = WS_CONTROLS[case]
    with ws_connect(servers[False]) as ws:
        for message in messages:
            ws.send_binary(message)
        code, text = expect_close(ws)
    assert code == 1011
    assert reason in text


# ---- property: random Ais-Node-Url values never get a 5xx ----------------------------------------

_url_chars = st.sampled_from([*"abz09.:/@%#?&=[]-_ \t,", "\xe9", "%41", "%zz", "..", "::"])
_junk = st.lists(_url_chars, max_size=30).map("".join)


@st.composite
def node_url_values(draw: st.DrawFn, port: int) -> str:
    """Hops to the fake target (with odd paths and queries) mixed with junk entries."""
    entries = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["stage", "dst", "junk", "scheme-junk"]))
        if kind == "stage":
            entries.append(f"http://127.0.0.1:{port}")
        elif kind == "dst":
            entries.append(f"http://127.0.0.1:{port}{DST_PATH}{draw(_junk)}")
        elif kind == "junk":
            entries.append(draw(_junk))
        else:
            scheme = draw(st.sampled_from(["http://", "https://", "ftp://", "HTTP://", ""]))
            entries.append(scheme + draw(_junk))
    return ",".join(entries)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), stream=st.booleans())
def test_property_random_node_url_never_5xx(
    servers: dict[bool, GunicornServer],
    module_target: FakeTarget,
    data: st.DataObject,
    stream: bool,
) -> None:
    """Valid pipelines (all hops on the fake target) are delivered (204); anything else 4xx."""
    value = data.draw(node_url_values(module_target.port))
    try:
        pipeline = parse_pipeline(value)
        valid = True
    except InvalidPipelineError:
        pipeline, valid = None, False
    if pipeline is not None:  # only ever contact the fake target (127.0.0.1 and its port)
        first = urlsplit(pipeline.first)
        assume((first.hostname, first.port) == ("127.0.0.1", module_target.port))
    module_target.reset()
    answer = exchange(servers[stream], put(b"/src/a.txt", node_url(value.encode("latin-1"))))
    event(f"status {answer.status}")
    assert answer.status < 500, (value, answer)
    if not valid:
        assert 400 <= answer.status < 500, (value, answer)
        assert module_target.requests == []
    elif pipeline is None:  # blank: no pipeline
        assert (answer.status, answer.body) == (200, b"HELLO"), (value, answer)
    else:
        assert answer.status == 204, (value, answer)
        (put_rec,) = module_target.puts
        assert put_rec.body == b"HELLO"


# ---- settings: garbage for every one -----------------------------------------------------------

SETTINGS = [f.metadata["env"] for f in dataclasses.fields(Settings)]
_garbage = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["-1", "0", "nan", "inf", "1e999", "0x10", "1_000", " 1 ", "٣", "true", "∞"]),
    st.text(min_size=1, max_size=8).map(lambda t: t * 500),
)


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(SETTINGS), value=_garbage)
def test_property_any_setting_value_parses_or_names_the_setting(name: str, value: str) -> None:
    env = {"AIS_TARGET_URL": "http://127.0.0.1:1/v1/etl/_object/x/s3cr3tABCD", name: value}
    try:
        Settings.from_env(env)
    except ConfigError as exc:
        if value.strip():
            assert str(exc).startswith(f"{name}={value.strip()!r}: "), exc
        else:  # blank counts as unset: only the required AIS_TARGET_URL can fail
            assert str(exc).startswith(f"Environment variable {name!r} must be set"), exc
