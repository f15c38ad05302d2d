"""Fixtures shared by the end-to-end tests, and the `slow` mark: a test that needs a real process is slow."""

import pytest

from tests.support.processes import FakeUpstreamProcess


@pytest.fixture(scope="module")
def upstream():
    """The project's fake OpenAI upstream as a real process on loopback, one per test module."""
    with FakeUpstreamProcess() as fake:
        yield fake


def pytest_collection_modifyitems(items):
    """Every test that uses the fake upstream process, directly or through a fixture, is slow."""
    for item in items:
        if "upstream" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
