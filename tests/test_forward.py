"""The forwarding path in memory: routes, access, headers, streaming, failover, errors, disconnects."""

import json

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.support.memory import MemoryProxy, split_response


def chat(stream=False, **extra):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "stream": stream}
    body.update(extra)
    return json.dumps(body).encode()


class ForwardingTests(SynchronousTestCase):
    def fetch(self, proxy, method, path, body=None, headers=None):
        d = proxy.client.request(method, "http://proxy.test" + path, data=body, headers=headers or {})
        proxy.flush()
        response = self.successResultOf(d)
        d = response.content()
        proxy.flush()
        return response, self.successResultOf(d)

    def test_a_held_stream_does_not_hold_its_prompt(self):
        # A long prompt streamed for a minute: once the answer is under way no other attempt can need the body,
        # so its memory (and its share of the process's budget for bodies) is given back at once.
        from fwd.body import SHARED_BUDGET

        proxy = MemoryProxy()
        before = SHARED_BUDGET.used
        body = chat(stream=True, messages=[{"role": "user", "content": "x" * 200_000}])
        d = proxy.client.post(
            "http://proxy.test/v1/chat/completions",
            data=body,
            headers={"x-fake-chunks": "4", "x-fake-interval": "1"},
        )
        proxy.flush()
        response = self.successResultOf(d)
        received = []
        finished = response.collect(received.append)
        proxy.flush()
        self.assertNoResult(finished)
        self.assertIn(b"data: ", b"".join(received))
        self.assertEqual(SHARED_BUDGET.used, before, "the streaming request still holds its body")
        for _ in range(5):
            proxy.advance(1)
        self.successResultOf(finished)
        self.assertTrue(b"".join(received).endswith(b"data: [DONE]\n\n"))
        self.assertEqual(proxy.upstream.received[-1].body, body)

    def test_an_ended_exchange_is_freed_as_it_ends_not_left_to_the_garbage_collector(self):
        # A request left in a reference cycle waits for the garbage collector, whose pauses (milliseconds each,
        # every few hundred requests) become the tail of every client's latency.
        import gc

        from twisted.internet.base import DelayedCall

        from fwd.exchange import Exchange
        from fwd.relay import Relay
        from fwd.site import ForwardRequest

        proxy = MemoryProxy()
        body = {False: chat(), True: chat(stream=True)}

        def exchange(stream):
            transport = proxy.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-fake-chunks: 3\r\n"
                                  b"x-fake-interval: 0\r\nContent-Length: %d\r\n\r\n%s" % (len(body[stream]), body[stream]))
            proxy.advance(0.1)
            self.assertEqual(split_response(transport.value())[0], 200)
            proxy.raw_protocol.connectionLost(Failure(ConnectionDone()))
            proxy.flush()

        for stream in (False, True):  # the first of each kind: pools and caches that live on
            exchange(stream)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for stream in (False, True, False, True):
                exchange(stream)
            proxy.raw_protocol = None
            gc.collect()
            left = sorted({type(o).__name__ for o in gc.garbage
                           if isinstance(o, (ForwardRequest, Exchange, Relay, DelayedCall))})
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
        self.assertEqual(left, [], "an exchange ended in a reference cycle")

    def test_every_method_and_the_query_string_reach_the_upstream_verbatim(self):
        proxy = MemoryProxy()
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
            response, _ = self.fetch(proxy, method, "/v1/things/x?a=1&b=%2F&c=%E2%9C%93")
            self.assertEqual(response.code, 200, method)
            received = proxy.upstream.received[-1]
            self.assertEqual((received.method, received.uri), (method.encode(), b"/v1/things/x?a=1&b=%2F&c=%E2%9C%93"))

    def test_the_upstream_sees_its_own_host_and_no_hop_by_hop_headers(self):
        proxy = MemoryProxy(hop_header_prefix="X-Scf")
        self.fetch(
            proxy,
            "POST",
            "/v1/chat/completions",
            chat(),
            {"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "X-Scf-Request": "2", "X-Custom": "3"},
        )
        names = {name.lower(): value for name, value in proxy.upstream.received[-1].headers}
        self.assertEqual(names[b"host"], b"upstream.test")
        self.assertEqual(names[b"x-custom"], b"3")
        for dropped in (b"x-secret-hop", b"x-scf-request", b"keep-alive"):
            self.assertNotIn(dropped, names)
        self.assertNotIn(b"X-Secret-Hop", names.get(b"connection", b""))

    def test_end_to_end_response_headers_come_back_to_the_client(self):
        proxy = MemoryProxy()
        response, body = self.fetch(proxy, "POST", "/v1/chat/completions", chat())
        self.assertTrue(response.headers.getRawHeaders("x-request-id")[0].startswith("req_"))
        self.assertIsNotNone(response.headers.getRawHeaders("x-ratelimit-remaining-requests"))
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], "echo: hello there")

    def test_a_streamed_reply_reaches_the_client_chunk_by_chunk_before_it_ends(self):
        proxy = MemoryProxy()
        d = proxy.client.post(
            "http://proxy.test/v1/chat/completions",
            data=chat(stream=True),
            headers={"x-fake-chunks": "4", "x-fake-interval": "1"},
        )
        proxy.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders("x-accel-buffering"), ["no"])
        self.assertEqual(response.headers.getRawHeaders("content-type")[0].split(";")[0], "text/event-stream")
        received = []
        finished = response.collect(received.append)
        proxy.flush()
        first = b"".join(received)
        self.assertIn(b"data: ", first)
        self.assertNotIn(b"[DONE]", first)
        self.assertNoResult(finished)
        for _ in range(5):
            proxy.advance(1)
        self.successResultOf(finished)
        self.assertTrue(b"".join(received).endswith(b"data: [DONE]\n\n"))

    def test_a_slow_client_pauses_the_upstream_transport(self):
        proxy = MemoryProxy()
        proxy.raw(b"GET /v1/big HTTP/1.1\r\nHost: p\r\nx-fake-bytes: 10000000\r\nx-fake-interval: 0.1\r\n\r\n")
        channel = proxy.raw_protocol.channel
        relay = channel.requests[0].producer
        self.assertIsNotNone(relay, "the relay is registered as the client's producer")
        calls = []
        upstream_transport = relay.transport
        upstream_transport.pauseProducing = lambda: calls.append("pause")
        upstream_transport.resumeProducing = lambda: calls.append("resume")
        channel.pauseProducing()  # what the reactor does when the client's socket buffer is full
        channel.resumeProducing()
        self.assertEqual(calls, ["pause", "resume"])

    def test_a_client_that_reads_nothing_is_disconnected_after_the_stall_timeout_and_its_upstream_stopped(self):
        proxy = MemoryProxy()
        transport = proxy.raw(b"GET /v1/big HTTP/1.1\r\nHost: p\r\nx-fake-bytes: 10000000\r\nx-fake-interval: 1\r\n\r\n")
        channel = proxy.raw_protocol.channel
        channel.pauseProducing()  # the client's socket buffer is full and stays full
        proxy.advance(proxy.config.idle_timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(proxy.gateway.in_flight, 1)
        proxy.advance(1)
        self.assertTrue(transport.disconnecting, "a client that never reads is not held for ever")
        channel.connectionLost(Failure(ConnectionDone()))
        proxy.flush()
        self.assertEqual(proxy.gateway.in_flight, 0)
        self.assertEqual(proxy.upstream.disconnects, 1, "its upstream request was stopped")

    def test_the_upstream_body_status_and_headers_of_an_error_pass_through_untouched(self):
        proxy = MemoryProxy()
        response, body = self.fetch(
            proxy, "POST", "/v1/chat/completions", chat(), {"x-fake-status": "400"}
        )
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(body)["error"]["type"], "invalid_request_error")

    def test_paths_outside_the_prefix_get_a_json_404_and_the_upstream_is_not_contacted(self):
        proxy = MemoryProxy(route_prefix="/openai")
        response, body = self.fetch(proxy, "GET", "/v1/models")
        self.assertEqual(response.code, 404)
        self.assertIn("ROUTE_PREFIX", json.loads(body)["error"]["message"])
        response, body = self.fetch(proxy, "GET", "/openaiX/v1/models")
        self.assertEqual(response.code, 404)
        self.assertEqual(proxy.upstream.received, [])
        response, _ = self.fetch(proxy, "GET", "/openai/v1/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(proxy.upstream.received[-1].uri, b"/v1/models")

    def test_dot_segments_never_escape_the_prefix(self):
        proxy = MemoryProxy(route_prefix="/openai")
        for path in (b"/openai/../admin", b"/openai/%2e%2e/admin", b"/openai/v1/..%2f..%2fadmin"):
            transport = proxy.raw(b"GET " + path + b" HTTP/1.1\r\nHost: p\r\n\r\n")
            status, _, body = split_response(transport.value())
            self.assertEqual(status, 400, path)
            self.assertEqual(json.loads(body)["error"]["code"], "invalid_path")
        self.assertEqual(proxy.upstream.received, [])

    def test_absolute_form_targets_never_reach_another_host(self):
        proxy = MemoryProxy()
        transport = proxy.raw(b"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: p\r\n\r\n")
        status, _, _ = split_response(transport.value())
        self.assertEqual(status, 404)
        self.assertEqual(proxy.upstream.received, [])

    def test_healthz_answers_locally_with_the_pid_and_no_keys(self):
        proxy = MemoryProxy(api_key="sk-secret-aaaa1111 sk-secret-bbbb2222", forward_key="fk-team-0001")
        response, body = self.fetch(proxy, "GET", "/healthz")
        health = json.loads(body)
        self.assertEqual(health["status"], "ok")
        self.assertIsInstance(health["pid"], int)
        self.assertEqual(health["routes"][0]["keys"]["available"], 2)
        self.assertNotIn(b"sk-secret", body)
        self.assertNotIn(b"fk-team", body)
        self.assertEqual(proxy.upstream.received, [])

    def test_a_body_over_max_body_size_gets_413_before_it_is_buffered(self):
        proxy = MemoryProxy(max_body_size="1000")
        transport = proxy.raw(b"POST /v1/files HTTP/1.1\r\nHost: p\r\nContent-Length: 5000000\r\n\r\n" + b"x" * 100)
        status, headers, body = split_response(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"]["code"], "body_too_large")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(proxy.upstream.received, [])

    def test_a_chunked_body_over_max_body_size_gets_413(self):
        proxy = MemoryProxy(max_body_size="1000")
        chunk = b"%x\r\n%s\r\n" % (600, b"y" * 600)
        transport = proxy.raw(
            b"POST /v1/files HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + chunk + chunk
        )
        status, _, _ = split_response(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(proxy.upstream.received, [])


class UpstreamFailureTests(SynchronousTestCase):
    def test_no_response_headers_within_timeout_is_a_504(self):
        proxy = MemoryProxy(timeout="30")
        d = proxy.client.post("http://proxy.test/v1/chat/completions", data=chat(), headers={"x-fake-fail": "hang-before-headers"})
        proxy.flush()
        proxy.advance(29)
        self.assertNoResult(d)
        proxy.advance(2)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 504)
        d = response.content()
        proxy.flush()
        error = json.loads(self.successResultOf(d))["error"]
        self.assertEqual(error["code"], "upstream_timeout")
        self.assertIn("TIMEOUT", error["message"])

    def test_an_upstream_that_closes_before_answering_is_a_502(self):
        proxy = MemoryProxy()
        d = proxy.client.post("http://proxy.test/v1/chat/completions", data=chat(), headers={"x-fake-fail": "close-before-headers"})
        proxy.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 502)
        d = response.content()
        proxy.flush()
        self.assertIn("OPENAI_BASE_URL", json.loads(self.successResultOf(d))["error"]["message"])

    def test_a_reset_mid_stream_aborts_the_client_connection(self):
        proxy = MemoryProxy()
        transport = proxy.raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"x-fake-fail: reset-mid-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(chat(True)), chat(True))
        )
        proxy.flush()
        self.assertIn(b"data: ", transport.value())
        self.assertTrue(transport.disconnected, "the client sees a broken stream")
        self.assertNotIn(b"0\r\n\r\n", transport.value(), "no clean end of the chunked body")

    def test_upstream_silence_mid_stream_beyond_idle_timeout_aborts_the_client(self):
        proxy = MemoryProxy(idle_timeout="20")
        transport = proxy.raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"x-fake-fail: hang-mid-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(chat(True)), chat(True))
        )
        proxy.advance(19)
        self.assertFalse(transport.disconnected)
        proxy.advance(2)
        self.assertTrue(transport.disconnected)

    def test_a_stream_whose_chunks_come_closer_than_the_idle_timeout_is_never_cut_and_silence_after_one_is(self):
        proxy = MemoryProxy(idle_timeout="20")
        transport = proxy.raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"x-fake-chunks: 5\r\nx-fake-interval: 15\r\nContent-Length: %d\r\n\r\n%s" % (len(chat(True)), chat(True))
        )
        for _ in range(16):
            proxy.advance(5)  # 80 s in all: four times the idle timeout, never 20 s without a chunk
        self.assertFalse(transport.disconnected)
        self.assertTrue(transport.value().endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), "the whole stream came")
        self.assertEqual(proxy.gateway.in_flight, 0)

        transport = proxy.raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"x-fake-chunks: 50\r\nx-fake-interval: 15\r\nx-fake-fail: hang-mid-stream\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(chat(True)), chat(True))
        )
        proxy.advance(19)
        self.assertFalse(transport.disconnected)
        proxy.advance(2)
        self.assertTrue(transport.disconnected, "20 s without a chunk")

    def test_a_client_that_disconnects_cancels_its_upstream_request(self):
        proxy = MemoryProxy()
        proxy.raw(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"x-fake-chunks: 50\r\nx-fake-interval: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(chat(True)), chat(True))
        )
        proxy.advance(2)
        self.assertEqual(proxy.upstream.disconnects, 0)
        proxy.raw_protocol.connectionLost(Exception("client went away"))
        proxy.flush()
        self.assertEqual(proxy.upstream.disconnects, 1)
        self.assertEqual(proxy.gateway.in_flight, 0)


class KeyPoolTests(SynchronousTestCase):
    def fetch(self, proxy, key=None, headers=None, path="/v1/chat/completions"):
        headers = dict(headers or {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        d = proxy.client.post("http://proxy.test" + path, data=chat(), headers=headers)
        proxy.flush()
        response = self.successResultOf(d)
        d = response.content()
        proxy.flush()
        return response, self.successResultOf(d)

    def test_forward_keys_are_served_from_the_pool_in_turn(self):
        proxy = MemoryProxy(api_key="sk-a0000001,sk-b0000002 sk-c0000003", forward_key="fk-alice0001")
        for _ in range(6):
            response, _ = self.fetch(proxy, "fk-alice0001")
            self.assertEqual(response.code, 200)
        keys = [r.key for r in proxy.upstream.received]
        self.assertEqual(keys, ["sk-a0000001", "sk-b0000002", "sk-c0000003"] * 2)

    def test_an_unknown_forward_key_is_401_and_the_upstream_is_never_contacted(self):
        proxy = MemoryProxy(api_key="sk-a0000001", forward_key="fk-alice0001")
        response, body = self.fetch(proxy, "fk-mallory01")
        self.assertEqual(response.code, 401)
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_api_key")
        response, _ = self.fetch(proxy)
        self.assertEqual(response.code, 401)
        self.assertEqual(proxy.upstream.received, [])

    def test_a_clients_own_key_passes_through_unchanged(self):
        proxy = MemoryProxy(api_key="sk-a0000001", forward_key="fk-alice0001")
        self.fetch(proxy, "sk-mine-999999")
        self.assertEqual(proxy.upstream.received[-1].key, "sk-mine-999999")

    def test_a_rate_limited_key_cools_down_and_the_request_is_replayed_on_the_next(self):
        proxy = MemoryProxy(api_key="sk-a0000001 sk-b0000002", forward_key="fk-alice0001")
        proxy.upstream.key_status["sk-a0000001"] = (429, 20.0)
        response, body = self.fetch(proxy, "fk-alice0001")
        self.assertEqual(response.code, 200)
        self.assertEqual([r.key for r in proxy.upstream.received], ["sk-a0000001", "sk-b0000002"])
        for _ in range(3):
            self.fetch(proxy, "fk-alice0001")
        self.assertEqual([r.key for r in proxy.upstream.received[2:]], ["sk-b0000002"] * 3)
        del proxy.upstream.key_status["sk-a0000001"]
        proxy.advance(21)
        self.fetch(proxy, "fk-alice0001")
        self.fetch(proxy, "fk-alice0001")
        self.assertIn("sk-a0000001", [r.key for r in proxy.upstream.received[-2:]])

    def test_a_revoked_key_is_disabled_and_skipped(self):
        proxy = MemoryProxy(api_key="sk-a0000001 sk-b0000002", forward_key="fk-alice0001")
        proxy.upstream.key_status["sk-a0000001"] = (401, None)
        response, _ = self.fetch(proxy, "fk-alice0001")
        self.assertEqual(response.code, 200)
        self.fetch(proxy, "fk-alice0001")
        self.assertEqual([r.key for r in proxy.upstream.received], ["sk-a0000001", "sk-b0000002", "sk-b0000002"])
        health = proxy.gateway.routes["/"].pool.health()
        self.assertEqual(health, {"available": 1, "cooling": 0, "disabled": 1})

    def test_every_key_rate_limited_is_a_429_with_retry_after(self):
        proxy = MemoryProxy(api_key="sk-a0000001 sk-b0000002", forward_key="fk-alice0001")
        proxy.upstream.key_status.update({"sk-a0000001": (429, 30.0), "sk-b0000002": (429, 10.0)})
        response, body = self.fetch(proxy, "fk-alice0001")
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["10"])
        self.assertEqual(json.loads(body)["error"]["code"], "rate_limit_exceeded")

    def test_every_key_revoked_is_a_503_with_retry_after(self):
        proxy = MemoryProxy(api_key="sk-a0000001", forward_key="fk-alice0001")
        proxy.upstream.key_status["sk-a0000001"] = (401, None)
        response, _ = self.fetch(proxy, "fk-alice0001")
        self.assertEqual(response.code, 503)
        self.assertIsNotNone(response.headers.getRawHeaders("retry-after"))

    def test_a_key_out_of_quota_is_disabled_not_merely_rested(self):
        proxy = MemoryProxy(api_key="sk-a0000001 sk-b0000002", forward_key="fk-alice0001")
        proxy.upstream.key_status["sk-a0000001"] = (429, None, "insufficient_quota")
        response, _ = self.fetch(proxy, "fk-alice0001")
        self.assertEqual(response.code, 200)
        self.assertEqual(proxy.gateway.routes["/"].pool.health(), {"available": 1, "cooling": 0, "disabled": 1})

    def test_a_403_about_the_region_reaches_the_client_and_rests_no_key(self):
        proxy = MemoryProxy(api_key="sk-a0000001 sk-b0000002", forward_key="fk-alice0001")
        response, body = self.fetch(
            proxy, "fk-alice0001", {"x-fake-status": "403", "x-fake-error-code": "unsupported_country_region_territory"}
        )
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(body)["error"]["code"], "unsupported_country_region_territory")
        self.assertEqual(len(proxy.upstream.received), 1, "not replayed: every key would get the same")
        self.assertEqual(proxy.gateway.routes["/"].pool.health()["available"], 2)

    def test_a_5xx_is_never_replayed(self):
        proxy = MemoryProxy(api_key="sk-a0000001 sk-b0000002", forward_key="fk-alice0001")
        response, _ = self.fetch(proxy, "fk-alice0001", {"x-fake-status": "500"})
        self.assertEqual(response.code, 500)
        self.assertEqual(len(proxy.upstream.received), 1)

    def test_a_model_outside_the_forward_keys_list_is_403(self):
        import os
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(
                '[[route]]\nbase_url = "http://upstream.test"\napi_keys = ["sk-a0000001"]\n'
                'forward_keys = [{key = "fk-bob00001", name = "bob", models = ["gpt-4o"]}]\n'
            )
        self.addCleanup(os.unlink, f.name)
        from fwd import config as configuration

        proxy = MemoryProxy(configuration.load({}, environ={}, dotenv_path=None, config_file=f.name))
        response, body = self.fetch(proxy, "fk-bob00001")
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(body)["error"]["code"], "model_not_allowed")
        self.assertEqual(proxy.upstream.received, [])
        d = proxy.client.get("http://proxy.test/v1/models", headers={"Authorization": "Bearer fk-bob00001"})
        proxy.flush()
        self.assertEqual(self.successResultOf(d).code, 200, "listing models names no model and is allowed")
        d = proxy.client.post("http://proxy.test/v1/batches", data=b"{}", headers={"Authorization": "Bearer fk-bob00001"})
        proxy.flush()
        self.assertEqual(self.successResultOf(d).code, 403, "a POST that names no model is refused")
        allowed = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
        d = proxy.client.post("http://proxy.test/v1/chat/completions", data=allowed,
                              headers={"Authorization": "Bearer fk-bob00001", "Content-Type": "application/json"})
        proxy.flush()
        self.assertEqual(self.successResultOf(d).code, 200, "its own model passes")
        self.assertEqual(proxy.upstream.received[-1].body, allowed)


def test_a_form_body_is_forwarded_as_it_is_never_parsed_by_the_proxy():
    proxy = MemoryProxy()
    body = b"--a\r\nnot really a part\r\n--a--"
    head = (b"POST /v1/files HTTP/1.1\r\nHost: p\r\nContent-Type: multipart/form-data; boundary=a\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    proxy.raw(head + body)
    assert proxy.upstream.received[-1].body == body, "the upstream judges the form, not the proxy"
