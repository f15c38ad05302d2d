"""The Resource tree: which route serves a path, what the upstream sees, and the forwarding leaf mounted in a
twisted.web Site of one's own, exactly as the README's "Embedding" section shows."""

import json

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from fwd import config
from fwd.gateway import Gateway
from fwd.resource import ForwardResource
from tests.support.memory import MemoryProxy
from tests.support.upstream import FakeUpstream

ROUTES = """
[[route]]
prefix = "/openai"
base_url = "http://openai.test/base"

[[route]]
prefix = "/openai/v2"
base_url = "http://v2.test"

[[route]]
prefix = ""
base_url = "http://root.test"
"""


def proxy_with_routes(tmp_path) -> MemoryProxy:
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES)
    return MemoryProxy(config=config.load({}, environ={}, dotenv_path=None, config_file=str(path)))


def fetch(proxy, method, path, **kw):
    d = proxy.client.request(method, "http://proxy.test" + path, **kw)
    proxy.flush()
    response = proxy_result(d)
    body = proxy_result(response.content(), proxy)
    return response.code, body


def proxy_result(d, proxy=None):
    if proxy is not None:
        proxy.flush()
    results = []
    d.addBoth(results.append)
    assert results, "no answer"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_the_longest_prefix_serves_and_the_upstream_gets_the_rest_with_the_query_verbatim(tmp_path):
    proxy = proxy_with_routes(tmp_path)
    for path, expected in [
        ("/openai/v1/files?purpose=fine-tune&a=%2F+b", b"/base/v1/files?purpose=fine-tune&a=%2F+b"),
        ("/openai/v2/models", b"/models"),
        ("/openai", b"/base/"),
        ("/openaiX/v1/models", b"/openaiX/v1/models"),
        ("/v1/models?x=%E2%9C%93", b"/v1/models?x=%E2%9C%93"),
    ]:
        status, _ = fetch(proxy, "GET", path)
        assert status == 200, path
        assert proxy.upstream.received[-1].uri == expected, path


def test_a_route_prefix_reached_through_percent_encoding_is_that_route(tmp_path):
    proxy = proxy_with_routes(tmp_path)
    fetch(proxy, "GET", "/open%61i/v1/models")
    assert proxy.upstream.received[-1].uri == b"/base/v1/models"


def test_outside_every_prefix_is_a_json_404_and_healthz_is_answered_locally():
    proxy = MemoryProxy(route_prefix="/openai")
    status, body = fetch(proxy, "GET", "/elsewhere/v1/models?api-key=sk-secret-in-query")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    assert b"sk-secret" not in body
    status, body = fetch(proxy, "GET", "/healthz")
    assert status == 200 and json.loads(body)["routes"][0]["prefix"] == "/openai"
    assert proxy.upstream.received == []


def test_a_path_with_dot_segments_never_leaves_its_prefix():
    proxy = MemoryProxy(route_prefix="/openai")
    for path in ("/openai/../admin", "/openai/%2e%2e/admin", "/openai/v1/..%2Fx"):
        status, body = fetch(proxy, "GET", path)
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_path", path
    assert proxy.upstream.received == []


# -- the README's "Embedding" section, in a test ------------------------------------------------------------


class EmbeddingTests(SynchronousTestCase):
    def test_the_forwarding_resource_mounted_in_a_plain_site_forwards_and_streams(self):
        clock = Clock()
        upstream = FakeUpstream(reactor=clock)
        settings = config.load(
            {"base_url": "https://api.openai.com", "api_key": "sk-pool-key-000000000001", "forward_key": "fk-team-0000000001"},
            environ={}, dotenv_path=None,
        )
        gateway = Gateway(settings, RequestTraversalAgent(upstream), clock)  # Gateway.connected(settings, reactor) for real
        root = Resource()
        root.putChild(b"openai", ForwardResource(gateway))
        client = StubTreq(root)

        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        d = client.post(
            "http://my.site/openai/v1/chat/completions", data=body.encode(),
            headers={"Authorization": "Bearer fk-team-0000000001", "Content-Type": "application/json"},
        )
        client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        text = self.successResultOf(response.text())
        self.assertTrue(text.endswith("data: [DONE]\n\n"))
        received = upstream.received[-1]
        self.assertEqual(received.uri, b"/v1/chat/completions")
        self.assertEqual(received.key, "sk-pool-key-000000000001")

        d = client.get("http://my.site/openai/v1/models", headers={"Authorization": "Bearer fk-unknown"})
        client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 401)
        self.assertEqual(self.successResultOf(response.json())["error"]["code"], "invalid_api_key")
        self.assertEqual(len(upstream.received), 1, "a refused request never reaches the upstream")


def test_a_bug_on_the_way_to_forwarding_is_an_openai_shaped_500_not_a_client_left_waiting(monkeypatch):
    # What goes wrong after the body was read and before an exchange takes the request is answered at once.
    from twisted.internet import defer

    from fwd import resource
    from tests.support.memory import split_response

    real = resource.read_request
    monkeypatch.setattr(resource, "read_request", lambda *a, **kw: defer.succeed(real(*a, **kw)))

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(ForwardResource, "_admit", broken)
    proxy = MemoryProxy()
    body = b'{"model": "gpt-4o-mini", "messages": []}'
    answer = proxy.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status, _, sent = split_response(answer.value())
    assert status == 500 and json.loads(sent)["error"]["type"], sent
    assert proxy.upstream.received == []
