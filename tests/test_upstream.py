"""Why the relay sends upstream requests with a plain Agent and not treq: what treq's HTTPClient would do to
relayed traffic, next to what the proxy does.  treq is right for the proxy's own requests (the key check)."""

import gzip

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from tests.support.memory import MemoryProxy, split_response

PLAIN = b'{"object": "list", "data": []}'


class Upstream(Resource):
    """Sets a cookie, answers gzip to whoever accepts it, and redirects /v1/old."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[bytes, dict[bytes, bytes]]] = []

    def render(self, request):
        headers = {n.lower(): b", ".join(v) for n, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append((request.path, headers))
        if request.path == b"/v1/old":
            request.setResponseCode(302)
            request.setHeader(b"location", b"/v1/models")
            return b""
        request.setHeader(b"set-cookie", b"upstream-session=tenant-a-secret; Path=/")
        request.setHeader(b"content-type", b"application/json")
        if b"gzip" in headers.get(b"accept-encoding", b""):
            request.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(PLAIN)
        return PLAIN


class WhyNotTreqForTheRelay(SynchronousTestCase):
    def treq(self, upstream):
        agent = RequestTraversalAgent(upstream)
        return HTTPClient(agent), agent

    def test_treq_carries_one_tenants_cookie_to_the_next_the_relay_never_does(self):
        upstream = Upstream()
        client, agent = self.treq(upstream)
        for tenant in (b"a", b"b"):
            d = client.get("http://upstream.test/v1/models", headers={b"x-tenant": tenant})
            agent.flush()
            self.successResultOf(self.successResultOf(d).content())
        self.assertEqual(upstream.seen[1][1].get(b"cookie"), b"upstream-session=tenant-a-secret")

        upstream = Upstream()
        proxy = MemoryProxy(upstream=upstream)
        first = proxy.raw(b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Tenant: a\r\n\r\n")
        self.assertIn(b"upstream-session=tenant-a-secret", split_response(first.value())[1][b"set-cookie"])
        proxy.raw(b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Tenant: b\r\n\r\n")
        self.assertNotIn(b"cookie", upstream.seen[1][1], "the relay keeps no cookie jar")

    def test_treq_rewrites_accept_encoding_and_inflates_the_relay_passes_both_untouched(self):
        upstream = Upstream()
        client, agent = self.treq(upstream)
        d = client.get("http://upstream.test/v1/models", headers={b"accept-encoding": b"br"})
        agent.flush()
        response = self.successResultOf(d)
        self.assertEqual(self.successResultOf(response.content()), PLAIN, "treq inflated the body")
        self.assertIn(b"gzip", upstream.seen[-1][1][b"accept-encoding"], "treq rewrote the client's Accept-Encoding")

        upstream = Upstream()
        proxy = MemoryProxy(upstream=upstream)
        answer = proxy.raw(b"GET /v1/models HTTP/1.1\r\nHost: p\r\nAccept-Encoding: br\r\n\r\n")
        self.assertEqual(upstream.seen[-1][1][b"accept-encoding"], b"br")
        self.assertNotIn(b"content-encoding", split_response(answer.value())[1])
        answer = proxy.raw(b"GET /v1/models HTTP/1.1\r\nHost: p\r\nAccept-Encoding: gzip\r\n\r\n")
        _, headers, body = split_response(answer.value())
        self.assertEqual(headers[b"content-encoding"], b"gzip")
        self.assertEqual(gzip.decompress(body), PLAIN, "the client gets the upstream's gzip bytes as they were")

    def test_treq_follows_redirects_the_relay_hands_the_redirect_to_the_client(self):
        upstream = Upstream()
        client, agent = self.treq(upstream)
        d = client.get("http://upstream.test/v1/old")
        agent.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual([path for path, _ in upstream.seen], [b"/v1/old", b"/v1/models"])

        upstream = Upstream()
        proxy = MemoryProxy(upstream=upstream)
        status, headers, _ = split_response(proxy.raw(b"GET /v1/old HTTP/1.1\r\nHost: p\r\n\r\n").value())
        self.assertEqual((status, headers[b"location"]), (302, b"/v1/models"))
        self.assertEqual([path for path, _ in upstream.seen], [b"/v1/old"])
