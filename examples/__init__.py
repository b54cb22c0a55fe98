"""Bundled example transformers (importable as ``examples.<module>:<Class>`` from the repo root)."""
