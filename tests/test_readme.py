"""README.md's settings table is the one generated from etl_wsgi.config (STYLE.md)."""

from __future__ import annotations

from pathlib import Path

from etl_wsgi.config import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_contains_the_generated_settings_table() -> None:
    assert README.is_file(), "README.md is missing"
    text = README.read_text(encoding="utf-8")
    assert settings_table() in text, (
        "README.md's settings table is out of date; paste etl_wsgi.config.settings_table()"
    )
