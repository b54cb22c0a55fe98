"""The bundled examples (examples/*.py) on real gunicorn gevent workers.

Every output is checked against a result computed independently in the test: hashlib, xxhash,
gzip/bz2, Pillow reading the image back, tarfile reading the archive.  Servers are booted once
per module and configuration (``example(...)``); start-up validation of the examples' own
environment variables is checked in-process (``make``).
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from http.client import HTTPMessage
from pathlib import Path
from urllib.parse import quote

import pytest
import xxhash
from PIL import Image

from etl_wsgi.config import ConfigError
from examples.compress import Compress
from examples.hash_with_args import HashWithArgs
from examples.image import ResizeGrayscale
from examples.jsonl_tar import JsonlToTar
from tests.conftest import GunicornServer
from tests.e2e_support import booted, request
from tests.fake_target import FakeTarget
from tests.unit_support import fqn_query, write_object

Answer = tuple[int, HTTPMessage, bytes]
DATA = os.urandom(200_000) + b"hello etl\n" * 1000


@pytest.fixture(scope="module")
def example(module_target: FakeTarget) -> Iterator[Callable[..., GunicornServer]]:
    """``example("examples.md5:Md5", **env)``: a server booted once per module and env."""
    servers: dict[tuple[str, tuple[tuple[str, str], ...]], GunicornServer] = {}
    with ExitStack() as stack:

        def get(app: str, **env: str) -> GunicornServer:
            key = (app, tuple(sorted(env.items())))
            if key not in servers:
                servers[key] = stack.enter_context(booted(app, module_target, **env))
            return servers[key]

        yield get


def put(server: GunicornServer, body: bytes, etl_args: str | None = None) -> Answer:
    """hpush: ``PUT /bucket/obj`` with ``body``; ``etl_args`` query-encoded as AIS does."""
    query = "" if etl_args is None else "?etl_args=" + quote(etl_args, safe="")
    return request(server, "PUT", "/bucket/obj" + query, body)


def ok(answer: Answer) -> bytes:
    status, _headers, body = answer
    assert status == 200, body
    return body


def error(answer: Answer, status: int) -> str:
    """The ``{"error": ...}`` message of a JSON error answer with ``status``."""
    got, headers, body = answer
    assert got == status, body
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)["error"]


# --- echo, hello world, md5 ----------------------------------------------------------------


def test_echo_returns_the_object(example) -> None:
    assert ok(put(example("examples.echo:Echo"), DATA)) == DATA


def test_hello_world_ignores_the_object(example) -> None:
    server = example("examples.hello_world:HelloWorld")
    assert ok(put(server, DATA)) == b"Hello World!"
    assert ok(put(server, b"")) == b"Hello World!"


def test_md5_is_the_hex_digest(example) -> None:
    assert ok(put(example("examples.md5:Md5"), DATA)) == hashlib.md5(DATA).hexdigest().encode()


def test_md5_of_a_local_file_with_direct_fqn(example, tmp_path: Path) -> None:
    """``ETL_DIRECT_FQN=true``: the example hashes the file itself, chunk by chunk."""
    data = DATA * 12  # several of the example's 1 MiB chunks
    obj = write_object(tmp_path / "@ais" / "src" / "big.bin", data)
    server = example("examples.md5:Md5", ETL_DIRECT_FQN="true")
    answer = request(server, "PUT", f"/src/big.bin?etl_fqn={fqn_query(obj)}")
    assert ok(answer) == hashlib.md5(data).hexdigest().encode()


# --- xxhash64 with a seed ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**64 - 1])
def test_xxhash64_seed_from_etl_args(example, seed: int) -> None:
    server = example("examples.hash_with_args:HashWithArgs", SEED_DEFAULT="99")
    expected = xxhash.xxh64(DATA, seed=seed).hexdigest().encode()
    assert ok(put(server, DATA, str(seed))) == expected


def test_xxhash64_default_seed_from_env(example) -> None:
    server = example("examples.hash_with_args:HashWithArgs", SEED_DEFAULT="99")
    assert ok(put(server, DATA)) == xxhash.xxh64(DATA, seed=99).hexdigest().encode()
    assert ok(put(server, DATA)) != xxhash.xxh64(DATA, seed=0).hexdigest().encode()


@pytest.mark.parametrize("seed", ["abc", "-1", str(2**64), "1.5"])
def test_xxhash64_bad_seed_is_400(example, seed: str) -> None:
    server = example("examples.hash_with_args:HashWithArgs", SEED_DEFAULT="99")
    assert "etl_args: seed must be" in error(put(server, DATA, seed), 400)


# --- gzip / bz2 ----------------------------------------------------------------------------

DECOMPRESS = {"gzip": gzip.decompress, "bz2": bz2.decompress}
COMPRESS = {"gzip": gzip.compress, "bz2": bz2.compress}


@pytest.mark.parametrize("codec", ["gzip", "bz2"])
@pytest.mark.parametrize("key", ["compression", "format"])
def test_compress_round_trips(example, codec: str, key: str) -> None:
    server = example("examples.compress:Compress")
    packed = ok(put(server, DATA, json.dumps({"mode": "compress", key: codec})))
    assert DECOMPRESS[codec](packed) == DATA
    args = json.dumps({"mode": "decompress", key: codec})
    assert ok(put(server, COMPRESS[codec](DATA), args)) == DATA


def test_compress_defaults_to_gzip(example) -> None:
    assert gzip.decompress(ok(put(example("examples.compress:Compress"), DATA))) == DATA


def test_compress_defaults_from_env(example) -> None:
    options = '{"mode": "decompress", "compression": "bz2"}'
    server = example("examples.compress:Compress", COMPRESS_OPTIONS=options)
    assert ok(put(server, bz2.compress(DATA))) == DATA
    assert gzip.decompress(ok(put(server, DATA, '{"mode": "compress", "format": "gzip"}'))) == DATA


@pytest.mark.parametrize(
    ("etl_args", "why"),
    [
        ("gzip", "not valid JSON"),
        ('["gzip"]', "must be a JSON object"),
        ('{"mode": "squash"}', "unsupported mode 'squash'"),
        ('{"compression": "zstd"}', "compression 'zstd'"),
        ('{"mode": ["compress"]}', "unsupported mode"),
        ('{"level": 9}', "unknown key(s) ['level']"),
        ('{"format": "gzip", "compression": "bz2"}', "disagree"),
    ],
)
def test_compress_bad_etl_args_is_400(example, etl_args: str, why: str) -> None:
    message = error(put(example("examples.compress:Compress"), DATA, etl_args), 400)
    assert "etl_args" in message
    assert why in message


@pytest.mark.parametrize("codec", ["gzip", "bz2"])
def test_decompress_of_other_data_is_422(example, codec: str) -> None:
    args = json.dumps({"mode": "decompress", "compression": codec})
    message = error(put(example("examples.compress:Compress"), DATA, args), 422)
    assert f"bucket/obj: not valid {codec} data" in message


# --- Pillow: resize to grayscale -----------------------------------------------------------


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def image_of(answer: Answer) -> Image.Image:
    status, headers, body = answer
    assert status == 200, body
    assert headers["Content-Type"] == "image/png"
    img = Image.open(io.BytesIO(body))
    assert img.format == "PNG"
    return img


#: ITU-R 601-2 luma of pure red, as the integer Pillow's "L" conversion gives (0.299 * 255).
RED_LUMA = 76


def test_image_resized_to_grayscale_from_etl_args(example) -> None:
    server = example("examples.image:ResizeGrayscale", IMAGE_SIZE="20x10")
    img = image_of(put(server, png((120, 80), (255, 0, 0)), '{"size": [32, 16]}'))
    assert (img.size, img.mode) == ((32, 16), "L")
    low, high = img.getextrema()
    assert RED_LUMA - 1 <= low <= high <= RED_LUMA + 1


def test_image_size_from_env(example) -> None:
    server = example("examples.image:ResizeGrayscale", IMAGE_SIZE="20x10")
    img = image_of(put(server, png((64, 64), (0, 0, 255))))
    assert (img.size, img.mode) == ((20, 10), "L")


@pytest.mark.parametrize("etl_args", ['{"size": [0, 5]}', '{"size": "32x16"}', '{"width": 3}'])
def test_image_bad_etl_args_is_400(example, etl_args: str) -> None:
    server = example("examples.image:ResizeGrayscale", IMAGE_SIZE="20x10")
    assert "etl_args" in error(put(server, png((8, 8), (1, 2, 3)), etl_args), 400)


def test_image_undecodable_is_422(example) -> None:
    server = example("examples.image:ResizeGrayscale", IMAGE_SIZE="20x10")
    assert "not a decodable image" in error(put(server, b"GIF89a? no"), 422)


# --- streaming: JSON Lines -> TAR ----------------------------------------------------------


def jsonl(records: list[dict[str, str]], sep: str = "\n") -> bytes:
    return sep.join(json.dumps(r) for r in records).encode()


def test_jsonl_to_tar_streams_every_line_as_a_member(example, tmp_path: Path) -> None:
    """A ~1 MB object, read from its file: http.client cannot read a reply while it sends a body.

    The archive is ~3.5 MB (3001 members of at least 1 KiB): many chunks on the wire.
    """
    records = [
        {"name": f"shard/{i:05d}.txt", "content": f"line {i} " * (i % 40)} for i in range(3000)
    ]
    blob = os.urandom(70_000)
    long_name = "deep/" * 30 + "é.bin"  # > 100 bytes and not ASCII: a pax header
    records.append({"name": long_name, "data": base64.b64encode(blob).decode()})
    body = jsonl(records[:1500]) + b"\n\n\r\n" + jsonl(records[1500:], sep="\r\n") + b"\n"

    obj = write_object(tmp_path / "@ais" / "b" / "o.jsonl", body)
    server = example("examples.jsonl_tar:JsonlToTar")
    status, headers, out = request(server, "PUT", f"/b/o.jsonl?etl_fqn={fqn_query(obj)}")

    assert status == 200, out
    assert headers["Content-Type"] == "application/x-tar"
    assert headers["Transfer-Encoding"] == "chunked"
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [r["name"] for r in records]
        assert {(m.mode, m.mtime) for m in members} == {(0o644, 0)}
        for member, record in zip(members[:-1], records[:-1], strict=True):
            assert tar.extractfile(member).read() == record["content"].encode()
        assert tar.extractfile(members[-1]).read() == blob


def test_jsonl_to_tar_is_deterministic(example) -> None:
    server = example("examples.jsonl_tar:JsonlToTar")
    body = jsonl([{"name": "a.txt", "content": "x"}])
    assert ok(put(server, body)) == ok(put(server, body))


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("not json", "line 1: not JSON"),
        ('{"content": "x"}', "'name' must be a non-empty string"),
        ('{"name": "../up", "content": "x"}', "unsafe member name"),
        ('{"name": "/abs", "content": "x"}', "unsafe member name"),
        ('{"name": "a"}', "exactly one of 'content'"),
        ('{"name": "a", "content": "x", "data": ""}', "exactly one of 'content'"),
        ('{"name": "a", "data": "***"}', "'data' is not base64"),
    ],
)
def test_jsonl_to_tar_bad_first_line_is_422(example, line: str, why: str) -> None:
    message = error(put(example("examples.jsonl_tar:JsonlToTar"), line.encode()), 422)
    assert why in message


# --- the examples' own settings fail at start-up, naming the variable -----------------------


@pytest.mark.parametrize(
    ("cls", "env", "value"),
    [
        (HashWithArgs, "SEED_DEFAULT", "seven"),
        (Compress, "COMPRESS_OPTIONS", "{bad"),
        (Compress, "COMPRESS_OPTIONS", '{"mode": "squash"}'),
        (ResizeGrayscale, "IMAGE_SIZE", "224"),
        (ResizeGrayscale, "IMAGE_FORMAT", "NOPE"),
        (JsonlToTar, "JSONL_MAX_LINE", "0"),
    ],
)
def test_bad_example_setting_stops_start_up(make, cls, env: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{env}="):
        make(cls, **{env: value})


# --- each example through `etl-wsgi run` (local bucket-to-bucket, real gunicorn) ------------

#: Every transport and input mode is used by some example.
RUNS = {
    "echo": ("examples.echo:Echo", ["--comm", "hpush", "--no-fqn"]),
    "hello": ("examples.hello_world:HelloWorld", ["--comm", "hpull"]),
    "md5": ("examples.md5:Md5", ["--comm", "ws", "--fqn"]),
    "xxhash": ("examples.hash_with_args:HashWithArgs", ["--etl-args", "7", "--direct-put"]),
    "bz2": (
        "examples.compress:Compress",
        ["--comm", "hpull", "--no-fqn", "--etl-args", '{"compression": "bz2"}'],
    ),
    "image": ("examples.image:ResizeGrayscale", ["--comm", "ws", "--etl-args", '{"size": [8, 4]}']),
    "tar": ("examples.jsonl_tar:JsonlToTar", ["--comm", "ws", "--no-fqn"]),
}
BLOBS = {"a.txt": b"hello etl", "dir/b.bin": DATA, "dir/sub/empty": b""}


def check_image(src: bytes, out: bytes) -> None:
    img = Image.open(io.BytesIO(out))
    assert (img.format, img.size, img.mode) == ("PNG", (8, 4), "L")


def check_tar(src: bytes, out: bytes) -> None:
    records = [json.loads(line) for line in src.splitlines()]
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == {r["name"]: r["content"].encode() for r in records}


def equals(expected: Callable[[bytes], bytes]) -> Callable[[bytes, bytes], None]:
    def check(src: bytes, out: bytes) -> None:
        assert out == expected(src)

    return check


#: name -> check(source object, transformed object), each computed independently.
CHECKS: dict[str, Callable[[bytes, bytes], None]] = {
    "echo": equals(lambda data: data),
    "hello": equals(lambda data: b"Hello World!"),
    "md5": equals(lambda data: hashlib.md5(data).hexdigest().encode()),
    "xxhash": equals(lambda data: xxhash.xxh64(data, seed=7).hexdigest().encode()),
    "bz2": lambda src, out: equals(lambda data: data)(src, bz2.decompress(out)),
    "image": check_image,
    "tar": check_tar,
}


def run_inputs(name: str) -> dict[str, bytes]:
    if name == "image":
        return {"red.png": png((30, 20), (255, 0, 0)), "blue/b.png": png((9, 9), (0, 0, 255))}
    if name == "tar":
        return {
            f"shard{i}/{i}.jsonl": jsonl(
                [{"name": f"m{i}/{j}.txt", "content": "x" * j} for j in range(i)]
            )
            for i in (1, 5)
        }
    return BLOBS


@pytest.mark.parametrize("name", list(RUNS))
def test_example_runs_through_etl_wsgi_run(name: str, tmp_path: Path) -> None:
    from tests.test_cli import etl_wsgi, tree  # the CLI's own subprocess helpers

    app, options = RUNS[name]
    src, dst = tmp_path / "src", tmp_path / "dst"
    inputs = run_inputs(name)
    for rel, data in inputs.items():
        write_object(src / rel, data)

    proc = etl_wsgi("run", app, "--src", str(src), "--dst", str(dst), "--jobs", "2", *options)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tree(dst)
    assert set(out) == set(inputs)
    for rel, data in inputs.items():
        CHECKS[name](data, out[rel])
