"""pytest plugin for the unit tests: ``pytest_plugins = ["tests.unit_fixtures"]``.

``target``: one :class:`FakeTarget` per test module, reset before each test.  A FakeTarget costs
~0.5 s to shut down (``serve_forever`` polls twice a second), which would dominate a fast unit
suite if every test started its own (the e2e tests use conftest's function-scoped
``fake_target``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_target import FakeTarget


@pytest.fixture(scope="module")
def module_target() -> Iterator[FakeTarget]:
    with FakeTarget() as fake:
        yield fake


@pytest.fixture
def target(module_target: FakeTarget) -> FakeTarget:
    """The module's FakeTarget with no objects, no script, ``Reply(200)`` and nothing recorded."""
    module_target.reset()
    return module_target
