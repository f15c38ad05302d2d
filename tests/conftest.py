"""Fixtures shared by the end-to-end tests, and the `slow` mark: a test that needs a real process is slow."""

import signal

import pytest

from tests.support.processes import FakeUpstreamProcess

# The tests send SIGINT as a terminal's Ctrl-C would.  A shell that starts the test run in the background makes
# it ignore SIGINT, and every daemon started from it would inherit that (twistd then leaves SIGINT ignored):
# the daemons get the disposition of a terminal's foreground instead.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def redis_server():
    """A real redis-server on loopback, one per test module; tests flush it as they need."""
    from tests.support.redis import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def upstream():
    """The project's fake OpenAI upstream as a real process on loopback, one per test module."""
    with FakeUpstreamProcess() as fake:
        yield fake


def pytest_collection_modifyitems(items):
    """Every test that uses the fake upstream process or a redis-server, directly or through a fixture, is slow."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "upstream" in names or "redis_server" in names:
            item.add_marker(pytest.mark.slow)
