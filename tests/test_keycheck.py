"""The startup key check: refused pool keys start disabled, nothing else condemns a key, and it never floods or
hangs.  In memory on a Clock through treq, and once against a real twistd."""

import json
import urllib.request

import pytest
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from fwd import config
from fwd.gateway import Gateway
from fwd.keycheck import KeyCheck, models_url
from fwd.settings import mask
from tests.support.processes import DaemonProcess
from tests.support.upstream import FakeUpstream

GOOD = "sk-check-good-key-00000000001"
REVOKED = "sk-check-revoked-key-0000002"
BROKE = "sk-check-no-money-key-000003"
BUSY = "sk-check-busy-key-0000000004"


def gateway_for(clock, keys, kind="openai"):
    path_config = {"base_url": "http://upstream.test", "api_key": " ".join(keys)}
    settings = config.load(path_config, environ={}, dotenv_path=None)
    if kind != "openai":
        import attrs

        settings = attrs.evolve(settings, routes=(attrs.evolve(settings.routes[0], kind=kind),))
    return Gateway(settings, None, clock)


class Hanging(Resource):
    """An upstream that never answers, counting the requests waiting on it."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.waiting = 0

    def render(self, request):
        self.waiting += 1
        return NOT_DONE_YET


class KeyCheckTests(SynchronousTestCase):
    def test_keys_the_upstream_refuses_start_disabled_and_the_rest_serve(self):
        clock = Clock()
        upstream = FakeUpstream(
            reactor=clock,
            key_status={REVOKED: (401, None), BROKE: (429, None, "insufficient_quota"), BUSY: (429, 20.0)},
        )
        gateway = gateway_for(clock, [GOOD, REVOKED, BROKE, BUSY])
        agent = RequestTraversalAgent(upstream)
        d = KeyCheck(HTTPClient(agent), clock).check(gateway)
        agent.flush()
        outcome = self.successResultOf(d)
        self.assertEqual(outcome[mask(REVOKED)], "disabled")
        self.assertEqual(outcome[mask(GOOD)], "accepted")
        self.assertEqual(outcome[mask(BUSY)], "answered 429", "a rate-limited key is not condemned by a check")
        pool = gateway.routes["/"].pool
        self.assertEqual(pool.health(), {"available": 3, "cooling": 0, "disabled": 1})
        self.assertNotIn(REVOKED, {pool.pick() for _ in range(10)})
        self.assertEqual({r.uri for r in upstream.received}, {b"/v1/models"})

    def test_an_unreachable_upstream_condemns_no_key(self):
        clock = Clock()

        class Refusing:
            def request(self, *args, **kw):
                return defer.fail(ConnectionRefusedError())

        gateway = gateway_for(clock, [GOOD, REVOKED])
        outcome = self.successResultOf(KeyCheck(HTTPClient(Refusing()), clock).check(gateway))
        self.assertEqual(set(outcome.values()), {"unreachable"})
        self.assertEqual(gateway.routes["/"].pool.health()["disabled"], 0)

    def test_at_most_four_checks_run_at_once_and_each_gives_up_after_its_timeout(self):
        clock = Clock()
        hanging = Hanging()
        keys = [f"sk-check-hanging-key-{n:08d}" for n in range(10)]
        gateway = gateway_for(clock, keys)
        agent = RequestTraversalAgent(hanging)
        d = KeyCheck(HTTPClient(agent), clock, concurrency=4, timeout=10).check(gateway)
        agent.flush()
        self.assertEqual(hanging.waiting, 4)
        for expected in (8, 10):
            clock.advance(10)
            agent.flush()
            self.assertEqual(hanging.waiting, expected)
        clock.advance(10)
        agent.flush()
        self.assertEqual(set(self.successResultOf(d).values()), {"unreachable"})
        self.assertEqual(gateway.routes["/"].pool.health()["disabled"], 0)

    def test_general_routes_are_not_checked_and_azure_keys_go_in_api_key(self):
        clock = Clock()
        upstream = FakeUpstream(reactor=clock)
        agent = RequestTraversalAgent(upstream)
        self.successResultOf(KeyCheck(HTTPClient(agent), clock).check(gateway_for(clock, [GOOD], kind="general")))
        self.assertEqual(upstream.received, [])
        d = KeyCheck(HTTPClient(agent), clock).check(gateway_for(clock, [GOOD], kind="azure"))
        agent.flush()
        self.successResultOf(d)
        received = upstream.received[-1]
        self.assertEqual(received.uri, b"/openai/models?api-version=2024-10-21")
        self.assertEqual(received.header("api-key"), GOOD.encode())
        self.assertIsNone(received.header("authorization"))

    def test_log_lines_name_keys_masked_only(self):
        clock = Clock()
        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            upstream = FakeUpstream(reactor=clock, key_status={REVOKED: (401, None)})
            agent = RequestTraversalAgent(upstream)
            d = KeyCheck(HTTPClient(agent), clock).check(gateway_for(clock, [GOOD, REVOKED]))
            agent.flush()
            self.successResultOf(d)
        finally:
            globalLogPublisher.removeObserver(events.append)
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn(mask(REVOKED), text)
        self.assertNotIn(REVOKED, text)
        self.assertNotIn(GOOD, text)


def test_the_models_url_of_each_kind_of_upstream():
    assert models_url("https://api.openai.com", "openai") == "https://api.openai.com/v1/models"
    assert models_url("https://gw.example/v1", "openai") == "https://gw.example/v1/models"
    assert models_url("https://r.openai.azure.com", "azure").startswith("https://r.openai.azure.com/openai/models?")


@pytest.mark.slow
def test_a_daemon_starts_with_the_keys_its_upstream_refuses_disabled(tmp_path):
    from tests.support.processes import FakeUpstreamProcess

    with FakeUpstreamProcess(key_status={REVOKED: (401, None)}) as upstream:
        env = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": f"{GOOD} {REVOKED}", "FORWARD_KEY": "fk-check-team-0001"}
        with DaemonProcess(env=env) as proxy:
            proxy.wait_for(f"key {mask(REVOKED)} rejected by the upstream (401), disabled")
            with urllib.request.urlopen(proxy.url + "/healthz", timeout=5) as answer:
                keys = json.loads(answer.read())["routes"][0]["keys"]
            assert keys == {"available": 1, "cooling": 0, "disabled": 1}
            upstream.reset()
            for _ in range(4):
                request = urllib.request.Request(
                    proxy.url + "/v1/models", headers={"Authorization": "Bearer fk-check-team-0001"}
                )
                with urllib.request.urlopen(request, timeout=5) as answer:
                    assert answer.status == 200
            assert {r["key"] for r in upstream.received()} == {GOOD}, "a disabled key is never tried"
