"""Fixtures shared by the end-to-end tests."""

import pytest

from fwd.testing import FakeUpstreamProcess


@pytest.fixture(scope="module")
def upstream():
    """The project's fake OpenAI upstream as a real process on loopback, one per test module."""
    with FakeUpstreamProcess() as fake:
        yield fake
