"""The AIS ETL specs in examples/specs/ (PROTOCOL.md §8.2) are consistent and start.

Each spec is parsed as AIS parses it; its fields must agree with each other and with the
settings (§1.1, §6.1, §9.1), and its ``runtime.command`` must pass ``gunicorn --check-config``
(which loads the config *and* the app) with the environment the pod would get (§1.2: runtime
env, then AIS's own variables).  That runs from an empty temporary directory, so no
``./gunicorn.conf.py`` is picked up that the image would not have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from etl_wsgi.app import resolve_etl
from etl_wsgi.config import Settings
from tests.unit_support import TARGET_URL, clear_settings_env

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "examples" / "specs").glob("*.yaml"))
COMMAND = ["gunicorn", "-c", "python:etl_wsgi.gunicorn_conf", "etl_wsgi.app:create_app()"]
#: Set by AIS itself (§1.2): a spec must not set them.
AIS_OWNED = {"AIS_TARGET_URL", "direct_put"}
#: Variables the examples read themselves (see each example's docstring).
EXAMPLE_VARS = {"SEED_DEFAULT", "COMPRESS_OPTIONS", "IMAGE_SIZE", "IMAGE_FORMAT", "JSONL_MAX_LINE"}
SETTING_VARS = {
    name
    for f in dataclasses.fields(Settings)
    for name in (f.metadata["env"], *f.metadata["aliases"])
}
TIMEOUT = 60


def load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        spec = yaml.safe_load(f)
    assert isinstance(spec, dict), path
    return spec


def pod_env(spec: dict[str, Any]) -> dict[str, str]:
    """The container's variables from the spec: ``runtime.env``, then the top-level ``env``."""
    env: dict[str, str] = {}
    for entry in [*spec["runtime"].get("env", []), *spec.get("env", [])]:
        assert set(entry) == {"name", "value"}, entry
        assert isinstance(entry["value"], str), f"{entry['name']}: quote the value"
        env[entry["name"]] = entry["value"]
    return env


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m|h)", duration)
    assert match, f"duration {duration!r}"
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


def ais_env(spec: dict[str, Any]) -> dict[str, str]:
    """The pod's environment as AIS makes it (§1.2), with a target nobody contacts."""
    return {
        **pod_env(spec),
        "AIS_TARGET_URL": TARGET_URL,
        "direct_put": str(spec["support_direct_put"]).lower(),
    }


def check_config(spec: dict[str, Any], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``gunicorn --check-config`` with the spec's command line and the pod's environment.

    The image's working directory holds ``examples/``; here ``PYTHONPATH`` plays that part.
    """
    command = spec["runtime"]["command"]
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ETL_", "AIS_", "GUNICORN_")) and k not in ("NUM_WORKERS",)
    }
    env = {**base, "PYTHONPATH": str(ROOT), **ais_env(spec)}
    argv = [sys.executable, "-m", "gunicorn", "--check-config", *command[1:]]
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_specs_cover_every_communication_and_direct_put() -> None:
    specs = [load(p) for p in SPECS]
    assert {s["communication"] for s in specs} == {"hpush://", "hpull://", "ws://"}
    assert {s["support_direct_put"] for s in specs} == {True, False}
    assert any("ETL_CLASS_PAYLOAD" in pod_env(s) for s in specs)


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_is_consistent(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load(path)
    env = pod_env(spec)
    name = spec["name"]
    assert path.stem == name
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{4,30}[a-z0-9]", name), "6-32 of [a-z0-9-]"
    assert spec["communication"] in ("hpush://", "hpull://", "ws://")
    assert isinstance(spec["support_direct_put"], bool)
    if spec["communication"] == "ws://":
        assert spec["support_direct_put"], "AIS requires support_direct_put with ws://"
    assert spec["runtime"]["image"]
    assert spec["runtime"]["command"] == COMMAND  # the Dockerfile's entry point, our config
    assert not AIS_OWNED & set(env), "AIS sets these itself"
    assert set(env) <= SETTING_VARS | EXAMPLE_VARS, "unknown variable (typo?)"
    assert ("ETL_CLASS" in env) != ("ETL_CLASS_PAYLOAD" in env), "exactly one class source"
    assert "ETL_BIND" not in env, "AIS expects port 8000 on all interfaces (§1.1)"
    assert seconds(spec["init_timeout"]) > 0

    # Every value is valid; gunicorn would restart a worker before AIS gives up on an object.
    clear_settings_env(monkeypatch, **ais_env(spec))
    settings = Settings.from_env()
    assert seconds(spec["obj_timeout"]) < settings.worker_timeout
    etl = resolve_etl()  # the class loads and constructs with this environment
    etl.session.close()


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_command_passes_gunicorn_check_config(path: Path, tmp_path: Path) -> None:
    done = check_config(load(path), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_config_catches_a_bad_class(tmp_path: Path) -> None:
    spec = load(SPECS[0])
    spec["runtime"]["env"] = [{"name": "ETL_CLASS", "value": "examples.md5:Nope"}]
    done = check_config(spec, tmp_path)
    assert done.returncode != 0
    assert "Cannot import ETL class 'examples.md5:Nope'" in done.stdout + done.stderr


# --- the Dockerfile (no Docker engine here: its text is checked, not a build) ---------------


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines)
        if word and not word.startswith("#")
    ]


def test_dockerfile_runs_the_specs_command_as_non_root_with_a_healthcheck() -> None:
    steps = dockerfile()
    words = [word for word, _ in steps]
    (cmd,) = [args for word, args in steps if word == "CMD"]
    assert json.loads(cmd) == COMMAND
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("0", "root") and words.index("USER") < words.index("CMD")
    (health,) = [args for word, args in steps if word == "HEALTHCHECK"]
    assert "/health" in health and "--timeout=5s" in health
    envs = [args for word, args in steps if word == "ENV"]
    assert not any("ETL_CLASS" in args for args in envs), "would clash with ETL_CLASS_PAYLOAD"
