"""etl_wsgi.protocol: pipeline header, direct-put URL, FQN, upstream URL (PROTOCOL.md §2-§4)."""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlsplit

import pytest
import urllib3
from hypothesis import given
from hypothesis import strategies as st

from etl_wsgi.errors import InvalidPipelineError
from etl_wsgi.protocol import (
    MAX_PIPELINE_ENTRY,
    ParsedRequest,
    Pipeline,
    compose_direct_put_url,
    is_stage_hop,
    parse_pipeline,
    redact_secret,
    sanitize_fqn,
    upstream_object_url,
)
from tests.unit_support import DST, FQN_J, FQN_Q, SECRET, TARGET_URL

# --- ParsedRequest --------------------------------------------------------------------------


def test_parsed_request_is_frozen_and_knows_get() -> None:
    req = ParsedRequest("GET", "src/a.txt")
    assert req.is_get
    assert (req.etl_args, req.fqn, req.node_url) == ("", "", "")
    assert not ParsedRequest("PUT", "src/a.txt").is_get
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.path = "x"  # type: ignore[misc]


# --- parse_pipeline (§4.1) ------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", " ", "   ", "\t \n"])
def test_blank_header_is_no_pipeline(header: str | None) -> None:
    assert parse_pipeline(header) is None


def test_single_hop() -> None:
    assert parse_pipeline(DST) == Pipeline(DST, "")


def test_remaining_is_the_rest_verbatim() -> None:
    header = f"http://127.0.0.1:5001,http://127.0.0.1:5002,{DST}"
    assert parse_pipeline(header) == Pipeline(
        "http://127.0.0.1:5001", f"http://127.0.0.1:5002,{DST}"
    )


def test_surrounding_whitespace_is_trimmed() -> None:
    pipeline = parse_pipeline(f"  http://a:1 ,  {DST}  ")
    assert pipeline == Pipeline("http://a:1", DST)


def test_inner_whitespace_of_the_rest_is_kept_like_the_sdk() -> None:
    # SDK parse_etl_pipeline: first and rest are each stripped, the rest is not re-joined.
    pipeline = parse_pipeline("http://a:1, http://b:2 , http://c:3")
    assert pipeline == Pipeline("http://a:1", "http://b:2 , http://c:3")


@pytest.mark.parametrize(
    "header",
    [
        "http://a:1,,http://b:2",
        ",http://a:1",
        "http://a:1,",
        "http://a:1, ,http://b:2",
        ",",
        " , ",
    ],
)
def test_empty_entry_is_invalid(header: str) -> None:
    with pytest.raises(InvalidPipelineError) as info:
        parse_pipeline(header)
    assert str(info.value) == "Pipeline header contains empty entry"
    assert info.value.message == "Invalid pipeline header: Pipeline header contains empty entry"
    assert info.value.status == 400


@pytest.mark.parametrize(
    "entry",
    [
        "ftp://10.0.0.2:9080",
        "ws://10.0.0.2:9080",
        "file:///etc/passwd",
        "10.0.0.2:9080",
        "/just/a/path",
        "http://",
        "http:///no-host",
    ],
)
def test_non_http_entries_are_invalid(entry: str) -> None:
    with pytest.raises(InvalidPipelineError, match="http:// or https://"):
        parse_pipeline(f"http://a:1,{entry}")


@pytest.mark.parametrize(
    "entry",
    ["http://a b:1", "http://a:1/x y", "http://a:1/x\ty", "http://a:1/\x7f", "http://a:1/\x01"],
)
def test_whitespace_or_control_inside_an_entry_is_invalid(entry: str) -> None:
    with pytest.raises(InvalidPipelineError, match="contains whitespace"):
        parse_pipeline(entry)


@pytest.mark.parametrize("entry", ["http://a:99999", "http://a:port", "http://a:-1", "http://[::1"])
def test_bad_port_or_host_is_invalid(entry: str) -> None:
    with pytest.raises(InvalidPipelineError, match="is not a URL"):
        parse_pipeline(entry)


@pytest.mark.parametrize(
    "entry",
    [
        "http://a..b/x",
        f"http://{'a' * 64}:1",
        "http://%41:1/x",
        "http://h\u00e9.com/x",
    ],
)
def test_host_names_the_http_client_would_mangle_or_refuse_are_invalid(entry: str) -> None:
    """Empty or 64+ character labels make urllib3 raise (was a 500); ``%41`` is looked up as
    ``a``; non-ASCII names are never AIS node addresses."""
    with pytest.raises(InvalidPipelineError, match="has an invalid host name"):
        parse_pipeline(entry)


@pytest.mark.parametrize(
    "entry", ["http://127.0.0.1:1", "http://a-b.c_d.example.:80/x", "http://[::1]:8080", "http://H"]
)
def test_ordinary_hosts_are_valid(entry: str) -> None:
    assert parse_pipeline(entry) == Pipeline(entry)


def test_overly_long_entry_is_invalid() -> None:
    entry = "http://a:1/" + "x" * MAX_PIPELINE_ENTRY
    with pytest.raises(InvalidPipelineError, match=f"longer than {MAX_PIPELINE_ENTRY}"):
        parse_pipeline(entry)
    ok = "http://a:1/" + "x" * (MAX_PIPELINE_ENTRY - len("http://a:1/"))
    assert parse_pipeline(ok) == Pipeline(ok, "")


def test_invalid_entry_message_is_bounded() -> None:
    entry = "ftp://a/" + "y" * 5000
    with pytest.raises(InvalidPipelineError) as info:
        parse_pipeline(entry)
    assert len(str(info.value)) < 400


# --- hypothesis: valid URLs ------------------------------------------------------------------

_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)
_host = st.one_of(
    st.lists(_label, min_size=1, max_size=3).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
)
_netloc = st.tuples(_host, st.one_of(st.none(), st.integers(1, 65535))).map(
    lambda hp: hp[0] if hp[1] is None else f"{hp[0]}:{hp[1]}"
)
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_path = st.one_of(
    st.sampled_from(["", "/"]),
    _text.filter(bool).map(lambda t: "/" + quote(t, safe="@")),
)
_query = st.one_of(
    st.just(""),
    st.tuples(st.integers(0, 9), _label).map(lambda t: f"owt={t[0]}&uuid={t[1]}"),
    st.tuples(_label, _label).map(lambda t: f"uuid={t[0]}&etl_args={t[1]}"),
)


@st.composite
def http_urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https"]))
    url = f"{scheme}://{draw(_netloc)}{draw(_path)}"
    query = draw(_query)
    return f"{url}?{query}" if query else url


@st.composite
def target_urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https"]))
    return f"{scheme}://{draw(_netloc)}/v1/etl/_object/{draw(_label)}/{draw(_label)}"


@given(st.lists(http_urls(), min_size=1, max_size=6))
def test_property_pipeline_first_and_rest(entries: list[str]) -> None:
    pipeline = parse_pipeline(",".join(entries))
    assert pipeline is not None
    assert pipeline.first == entries[0]
    assert pipeline.remaining == ",".join(entries[1:])


@given(st.lists(http_urls(), min_size=2, max_size=6), st.integers(0, 5))
def test_property_any_empty_entry_is_invalid(entries: list[str], at: int) -> None:
    entries.insert(at % (len(entries) + 1), " ")
    with pytest.raises(InvalidPipelineError, match=r"^Pipeline header contains empty entry$"):
        parse_pipeline(",".join(entries))


_urlish = st.lists(
    st.one_of(
        st.sampled_from(
            ["http://", "https://", "ftp://", "[", "]", "::1", "..", "%41", "%zz", "@"]
        ),
        st.text(st.characters(max_codepoint=0x17F), max_size=6),
    ),
    max_size=8,
).map("".join)


@given(st.one_of(st.text(max_size=60), _urlish, st.lists(_urlish, max_size=4).map(",".join)))
def test_property_any_header_parses_or_is_invalid_pipeline(header: str) -> None:
    """Arbitrary text never escapes as another exception (that would be a 500)."""
    try:
        parse_pipeline(header)
    except InvalidPipelineError:
        pass


@given(
    st.one_of(_urlish, http_urls()).map(lambda u: u if "://" in u else "http://127.0.0.1" + u),
    target_urls(),
    _text,
    _text,
)
def test_property_accepted_hops_compose_urls_the_http_client_can_use(
    hop: str, host_target: str, obj_path: str, etl_args: str
) -> None:
    """Whatever ``parse_pipeline`` accepts, urllib3 parses the composed URL with the same host
    (else the put would fail with a 500, or go to another host)."""
    try:
        pipeline = parse_pipeline(hop)
    except InvalidPipelineError:
        return
    assert pipeline is not None
    url = compose_direct_put_url(pipeline.first, host_target, obj_path, etl_args)
    parsed = urllib3.util.parse_url(url)
    assert parsed.host is not None
    assert parsed.host.strip("[]").lower() == urlsplit(pipeline.first).hostname


# --- compose_direct_put_url (§4.2) -----------------------------------------------------------


def test_protocol_example_exactly() -> None:
    assert (
        compose_direct_put_url(DST, TARGET_URL, "src/a.txt", "q")
        == "http://10.0.0.2:9080/v1/etl/_object/etl-upper/s3cr3tABCD/ais%2F@%23%2Fdst%2Fa.txt"
        "?owt=3&uuid=XID1&etl_args=q"
    )


def test_no_etl_args_keeps_the_query_byte_exact() -> None:
    hop = "http://10.0.0.2:9080/ais%2F@%23%2Fdst%2Fa.txt?uuid=X%2FY&owt=3&z=a+b&empty="
    url = compose_direct_put_url(hop, TARGET_URL, "src/a.txt")
    assert url == (
        "http://10.0.0.2:9080/v1/etl/_object/etl-upper/s3cr3tABCD/ais%2F@%23%2Fdst%2Fa.txt"
        "?uuid=X%2FY&owt=3&z=a+b&empty="
    )


def test_no_query_no_etl_args() -> None:
    url = compose_direct_put_url("http://10.0.0.2:9080/ais%2F@%23%2Fb%2Fo", TARGET_URL, "x")
    assert url == "http://10.0.0.2:9080/v1/etl/_object/etl-upper/s3cr3tABCD/ais%2F@%23%2Fb%2Fo"


def test_etl_args_is_added_url_encoded() -> None:
    url = compose_direct_put_url(DST, TARGET_URL, "src/a.txt", "a b&c=d/é")
    assert url.endswith("?owt=3&uuid=XID1&etl_args=a+b%26c%3Dd%2F%C3%A9")
    assert parse_qs(urlsplit(url).query)["etl_args"] == ["a b&c=d/é"]


def test_etl_args_replaces_an_existing_one() -> None:
    hop = "http://10.0.0.2:9080/ais%2F@%23%2Fdst%2Fa.txt?etl_args=old&owt=3&etl_args=older"
    url = compose_direct_put_url(hop, TARGET_URL, "src/a.txt", "new")
    assert urlsplit(url).query == "owt=3&etl_args=new"


def test_etl_fqn_is_never_added() -> None:
    url = compose_direct_put_url(DST, TARGET_URL, "src/a.txt", "q")
    assert "etl_fqn" not in url


@pytest.mark.parametrize("hop", ["http://127.0.0.1:5001", "http://127.0.0.1:5001/"])
def test_stage_hop_gets_the_escaped_object_path(hop: str) -> None:
    url = compose_direct_put_url(hop, TARGET_URL, "ais/@#/src/dir/a b?c%d.txt", "q")
    assert url == "http://127.0.0.1:5001/ais/@%23/src/dir/a%20b%3Fc%25d.txt?etl_args=q"
    assert url.split("?")[0].removeprefix("http://127.0.0.1:5001") == "/" + quote(
        "ais/@#/src/dir/a b?c%d.txt", safe="/@"
    )


def test_stage_hop_keeps_its_own_scheme() -> None:
    https_target = TARGET_URL.replace("http://", "https://")
    assert compose_direct_put_url("http://127.0.0.1:5001", https_target, "a.txt") == (
        "http://127.0.0.1:5001/a.txt"
    )
    assert compose_direct_put_url("https://127.0.0.1:5001", TARGET_URL, "a.txt") == (
        "https://127.0.0.1:5001/a.txt"
    )


def test_destination_hop_uses_the_target_scheme_and_prefixes_its_path() -> None:
    https_target = TARGET_URL.replace("http://", "https://")
    url = compose_direct_put_url(DST, https_target, "src/a.txt")
    assert url == (
        "https://10.0.0.2:9080/v1/etl/_object/etl-upper/s3cr3tABCD/ais%2F@%23%2Fdst%2Fa.txt"
        "?owt=3&uuid=XID1"
    )


def test_target_url_trailing_slash_does_not_double() -> None:
    url = compose_direct_put_url(DST, TARGET_URL + "/", "src/a.txt")
    assert "/s3cr3tABCD/ais%2F" in url
    assert "//ais" not in url


@pytest.mark.parametrize(
    ("hop", "stage"),
    [
        ("http://a:1", True),
        ("http://a:1/", True),
        ("http://a:1?x=1", True),
        ("http://a:1/o", False),
        (DST, False),
    ],
)
def test_is_stage_hop(hop: str, stage: bool) -> None:
    assert is_stage_hop(hop) is stage


_no_fqn = _text.filter(lambda s: "etl_fqn" not in s)


@given(http_urls(), target_urls(), _no_fqn, _no_fqn.filter(bool))
def test_property_compose_direct_put_url(
    hop: str, host_target: str, obj_path: str, etl_args: str
) -> None:
    url = compose_direct_put_url(hop, host_target, obj_path, etl_args)
    h, t, u = urlsplit(hop), urlsplit(host_target), urlsplit(url)
    assert "etl_fqn" not in url
    if h.path in ("", "/"):
        assert url.startswith(f"{h.scheme}://{h.netloc}/")
        assert unquote(u.path) == "/" + obj_path
    else:
        assert url.startswith(f"{t.scheme}://{h.netloc}/")
        assert u.path == t.path + h.path
    query = parse_qs(u.query, keep_blank_values=True)
    assert query["etl_args"] == [etl_args]
    kept = [(k, v) for k, v in parse_qsl(h.query) if k != "etl_args"]
    assert [(k, v) for k, v in parse_qsl(u.query) if k != "etl_args"] == kept
    assert u.fragment == ""


@given(http_urls(), target_urls(), _no_fqn)
def test_property_without_etl_args_query_is_untouched(
    hop: str, host_target: str, obj_path: str
) -> None:
    url = compose_direct_put_url(hop, host_target, obj_path)
    assert urlsplit(url).query == urlsplit(hop).query
    assert "etl_fqn" not in url


# --- sanitize_fqn (§3) -----------------------------------------------------------------------


def test_fqn_protocol_example_decodes() -> None:
    # the query value as the framework decodes it, then sanitize's second decode
    (value,) = parse_qs(f"etl_fqn={FQN_Q}")["etl_fqn"]
    assert value == FQN_J
    assert sanitize_fqn(value) == "/mp1/@ais/src/%ob/hello.txt"


@pytest.mark.parametrize(
    ("fqn", "expected"),
    [
        ("%2F..%2F..%2Fetc%2Fpasswd", "/etc/passwd"),
        ("/mp1/../../../etc/passwd", "/etc/passwd"),
        ("mp1/a/./b/../c", "/mp1/a/c"),
        ("//mp1//a///b", "/mp1/a/b"),
        ("%2F%2Fmp1%2F", "/mp1"),
        ("", "/"),
        ("a+b%20c", "/a+b c"),
        ("%252F", "/%2F"),
    ],
)
def test_fqn_normalization(fqn: str, expected: str) -> None:
    assert sanitize_fqn(fqn) == expected


@given(_text)
def test_property_fqn_is_absolute_and_normalized(fqn: str) -> None:
    out = sanitize_fqn(fqn)
    assert out.startswith("/")
    assert "/../" not in out + "/"
    assert not out.startswith("//")


# --- upstream_object_url (§2.6) --------------------------------------------------------------


def test_upstream_url_protocol_vector_6() -> None:
    assert upstream_object_url(TARGET_URL, "ais/@#/src/hello.txt") == (
        "http://10.0.0.1:9080/v1/etl/_object/etl-upper/s3cr3tABCD/ais%2F@%23%2Fsrc%2Fhello.txt"
    )


def test_upstream_url_escapes_everything_but_at() -> None:
    url = upstream_object_url(TARGET_URL + "/", "a b?c#d%e/f@g")
    assert url == TARGET_URL + "/a%20b%3Fc%23d%25e%2Ff@g"


@given(_text)
def test_property_upstream_url_round_trips(path: str) -> None:
    url = upstream_object_url(TARGET_URL, path)
    head, _, last = url.rpartition("/")
    assert head == TARGET_URL
    assert unquote(last) == path
    assert "?" not in last
    assert "#" not in last


# --- redact_secret ---------------------------------------------------------------------------


def test_redact_secret() -> None:
    text = f"direct_put to '{TARGET_URL}/ais%2Fx' failed"
    out = redact_secret(text, TARGET_URL)
    assert SECRET not in out
    assert out == "direct_put to 'http://10.0.0.1:9080/v1/etl/_object/etl-upper/***/ais%2Fx' failed"


def test_redact_secret_every_occurrence_and_trailing_slash() -> None:
    assert redact_secret(f"{SECRET} {SECRET}", TARGET_URL + "/") == "*** ***"


@pytest.mark.parametrize("host", ["http://h:1", "http://h:1/", "http://h:1/v1/abc"])
def test_redact_secret_leaves_text_alone_without_a_plausible_secret(host: str) -> None:
    assert redact_secret("abc v1 h 1", host) == "abc v1 h 1"
