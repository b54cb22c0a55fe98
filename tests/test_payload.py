"""``ETL_CLASS_PAYLOAD``: a class shipped as aistore's ``init_class`` does (PROTOCOL.md §8.3).

Payloads are made here as the SDK makes them (``cloudpickle.dumps`` -> base64), from modules
written to a temporary directory that the gunicorn workers cannot import: the class must travel
by value.
"""

from __future__ import annotations

import base64
import importlib
import io
import pickle
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import cloudpickle
import pytest

from etl_wsgi.app import resolve_etl
from etl_wsgi.base_etl_server import CountingIterator, ETLServer
from etl_wsgi.config import ConfigError
from etl_wsgi.flask_server import FlaskServer
from etl_wsgi.payload import _Unpickler, load_class
from tests.e2e_support import TIMEOUT, request
from tests.unit_support import TARGET_URL, clear_settings_env

OURS = """
from etl_wsgi import ETLServer

class Reverse(ETLServer):
    def transform(self, data, path, etl_args):
        return data[::-1] + etl_args.encode()
"""

#: A stand-in for the aistore SDK's module layout (only names and constructors matter).
FAKE_SDK = {
    "aistore/__init__.py": "",
    "aistore/sdk/__init__.py": "",
    "aistore/sdk/etl/__init__.py": "",
    "aistore/sdk/etl/webserver/__init__.py": "",
    "aistore/sdk/etl/webserver/base_etl_server.py": "class ETLServer:\n    pass\n",
    "aistore/sdk/etl/webserver/fastapi_server.py": (
        "from aistore.sdk.etl.webserver.base_etl_server import ETLServer\n\n"
        "class FastAPIServer(ETLServer):\n"
        "    def __init__(self, host='0.0.0.0', port=8000):\n"
        "        self.host, self.port = host, port\n"
    ),
}

#: Written for the SDK, as in ais-etl's hash_with_args: FastAPIServer, super().__init__(port=).
SDK_USER = """
import hashlib
from aistore.sdk.etl.webserver.fastapi_server import FastAPIServer

class Md5Sdk(FastAPIServer):
    def __init__(self, port: int = 8000):
        super().__init__(port=port)
        self.prefix = b"md5:"

    def transform(self, data, _path, etl_args):
        return self.prefix + hashlib.md5(data).hexdigest().encode()

    def get_mime_type(self):
        return "text/plain"
"""


@pytest.fixture
def module_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., ModuleType]:
    """``module_from(name, source, **files)``: import a module written to ``tmp_path``."""

    def load(name: str, source: str, **files: str) -> ModuleType:
        for rel, text in files.items():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text(text)
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        for mod in [m for m in sys.modules if m == name or m.split(".")[0] == "aistore"]:
            monkeypatch.delitem(sys.modules, mod)
        return importlib.import_module(name)

    yield load
    for mod in [m for m in sys.modules if m.startswith(("user_etl", "sdk_user", "aistore"))]:
        del sys.modules[mod]


def payload_of(cls: type, module: ModuleType) -> str:
    """What ``init_class`` puts in ``ETL_CLASS_PAYLOAD``: base64 of a by-value cloudpickle."""
    cloudpickle.register_pickle_by_value(module)
    try:
        return base64.b64encode(cloudpickle.dumps(cls)).decode()
    finally:
        cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture
def reverse_payload(module_from) -> str:
    mod = module_from("user_etl", OURS)
    return payload_of(mod.Reverse, mod)


@pytest.fixture
def sdk_payload(module_from) -> str:
    mod = module_from("sdk_user", SDK_USER, **{p: t for p, t in FAKE_SDK.items()})
    return payload_of(mod.Md5Sdk, mod)


# --- on the real server ------------------------------------------------------------------------


def test_payload_class_is_served(serve, reverse_payload: str) -> None:
    server = serve("etl_wsgi.app:create_app()", ETL_CLASS_PAYLOAD=reverse_payload)
    status, _headers, body = request(server, "PUT", "/b/o?etl_args=!", b"hello")
    assert (status, body) == (200, b"olleh!")


def test_payload_honours_num_workers(serve, reverse_payload: str) -> None:
    """The AIS runtime's ``NUM_WORKERS`` (ETL_WORKERS="" counts as unset: the alias applies)."""
    server = serve(
        "etl_wsgi.app:create_app()",
        ETL_CLASS_PAYLOAD=reverse_payload,
        ETL_WORKERS="",
        NUM_WORKERS="2",
    )
    deadline = time.monotonic() + TIMEOUT  # the master forks workers one after the other
    while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.worker_pids()) == 2, server.log()
    assert request(server, "PUT", "/b/o", b"ab")[2] == b"ba"


def test_sdk_class_is_served_without_aistore(serve, sdk_payload: str) -> None:
    """Pickled against aistore's FastAPIServer; the workers have no ``aistore`` at all."""
    server = serve("etl_wsgi.app:create_app()", ETL_CLASS_PAYLOAD=sdk_payload)
    status, headers, body = request(server, "PUT", "/b/o", b"hello")
    assert (status, body) == (200, b"md5:5d41402abc4b2a76b9719d911017c592")
    assert headers["Content-Type"].startswith("text/plain")


def test_bad_payload_stops_the_server_naming_the_variable(serve) -> None:
    with pytest.raises(RuntimeError, match=r"ETL_CLASS_PAYLOAD"):
        serve("etl_wsgi.app:create_app()", ETL_CLASS_PAYLOAD="not base64!")


# --- in-process: what each failure says ---------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    clear_settings_env(monkeypatch, AIS_TARGET_URL=TARGET_URL)
    return monkeypatch


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("module", "name", "ours"),
    [
        ("base_etl_server", "ETLServer", ETLServer),
        ("base_etl_server", "CountingIterator", CountingIterator),
        ("flask_server", "FlaskServer", FlaskServer),
        ("fastapi_server", "FastAPIServer", FlaskServer),
        ("http_multi_threaded_server", "HTTPMultiThreadedServer", FlaskServer),
    ],
)
def test_sdk_names_resolve_to_ours(module: str, name: str, ours: type) -> None:
    """(In-process cloudpickle would hand back the still-loaded original class; the e2e test
    above unpickles in a fresh worker.)"""
    unpickler = _Unpickler(io.BytesIO(b""))
    assert unpickler.find_class(f"aistore.sdk.etl.webserver.{module}", name) is ours


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ("@@@", "ETL_CLASS_PAYLOAD: not valid base64"),
        (b64(b"not a pickle"), "ETL_CLASS_PAYLOAD: cannot unpickle the class: UnpicklingError"),
        (b64(pickle.dumps(42)), "ETL_CLASS_PAYLOAD: holds 42, expected an ETLServer subclass"),
        (b64(pickle.dumps(dict)), "ETL_CLASS_PAYLOAD: holds <class 'dict'>"),
    ],
)
def test_load_class_errors_name_the_variable(payload: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_class(payload)
    assert str(info.value).startswith(why)


def test_missing_module_by_reference_says_what_to_do(module_from) -> None:
    mod = module_from("user_etl_ref", OURS)
    payload = b64(cloudpickle.dumps(mod.Reverse))  # by reference: needs user_etl_ref installed
    del sys.modules["user_etl_ref"]
    sys.path.remove(str(Path(mod.__file__).parent))
    with pytest.raises(ConfigError, match=r"ModuleNotFoundError.*register_pickle_by_value"):
        load_class(payload)


def test_bad_base64_is_refused_with_the_other_settings(env) -> None:
    env.setenv("ETL_CLASS_PAYLOAD", "not base64!")
    with pytest.raises(ConfigError, match=r"^ETL_CLASS_PAYLOAD='not base64!': not valid base64"):
        resolve_etl()


def test_etl_class_and_payload_are_exclusive(env, reverse_payload: str) -> None:
    env.setenv("ETL_CLASS_PAYLOAD", reverse_payload)
    env.setenv("ETL_CLASS", "tests.transformers:Upper")
    with pytest.raises(ConfigError, match="only one of ETL_CLASS and ETL_CLASS_PAYLOAD"):
        resolve_etl()


def test_resolve_reads_the_payload(env, reverse_payload: str) -> None:
    env.setenv("ETL_CLASS_PAYLOAD", reverse_payload)
    etl = resolve_etl()
    try:
        assert type(etl).__name__ == "Reverse"
        assert etl.transform(b"abc", "p", "") == b"cba"
    finally:
        etl.session.close()
