"""README.md: the settings table is generated from etl_wsgi.config (STYLE.md); its commands work."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from etl_wsgi.cli import main
from etl_wsgi.config import settings_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_readme_contains_the_generated_settings_table() -> None:
    assert README.is_file(), "README.md is missing"
    text = README.read_text(encoding="utf-8")
    assert settings_table() in text, (
        "README.md's settings table is out of date; paste etl_wsgi.config.settings_table()"
    )


def commands(prefix: str) -> list[list[str]]:
    """Every README command line starting with ``prefix``, split as the shell does."""
    lines = README.read_text(encoding="utf-8").splitlines()
    return [shlex.split(ln.strip(), comments=True) for ln in lines if ln.strip().startswith(prefix)]


def test_readme_main_command_installs_and_runs_etl_wsgi_run(tmp_path: Path) -> None:
    """The one-line main job: venv, install, ``etl-wsgi run`` over examples/data (run for real)."""
    (line,) = [ln for ln in README.read_text().splitlines() if ".venv/bin/etl-wsgi run" in ln]
    steps = [shlex.split(step) for step in line.split("&&")]
    assert steps[0] == ["python3", "-m", "venv", ".venv"]
    assert steps[1][:3] == [".venv/bin/pip", "install", "-q"] and steps[1][-2:] == ["-e", "."]
    run = steps[2]
    assert run[:2] == [".venv/bin/etl-wsgi", "run"]
    assert run[-2] == "--dst"
    dst = tmp_path / "out"
    args = [*run[1:-2], "--dst", str(dst)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "AIS_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "etl_wsgi", *args, "--workers", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    src = ROOT / "examples" / "data"
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == names
    claim = f"{len(names)}/{len(names)} objects transformed"
    assert claim in proc.stdout and claim in README.read_text()


def test_readme_cli_examples_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``etl-wsgi ...`` example of Quick start and CLI is a valid invocation."""
    monkeypatch.chdir(ROOT)
    examples = commands("etl-wsgi ")
    assert {args[1] for args in examples} == {"check", "run", "serve"}
    for args in examples:
        command = main.commands[args[1]]
        with command.make_context(args[1], args[2:]) as ctx:
            assert ctx.params["etl_class"] == args[2]
