"""Tests for tests.support.upstream, the fake OpenAI upstream the other tests run against."""

import base64
import hashlib
import json
import struct

import httpx2
import openai
import pytest
import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.server import Site

from tests.support.processes import FakeUpstreamProcess
from tests.support.upstream import FakeUpstream, parse_multipart

URL = "http://upstream.test"
BOUNDARY = b"fake-boundary-42"


def sse_events(body):
    """The data payloads of an SSE body, checking the exact framing."""
    assert body.endswith(b"\n\n")
    events = body[:-2].split(b"\n\n")
    assert all(event.startswith(b"data: ") and b"\n" not in event for event in events), events
    return [event[len(b"data: ") :] for event in events]


def multipart(parts):
    """Encode [(name, filename or None, bytes)] as multipart/form-data."""
    out = b""
    for name, filename, data in parts:
        disposition = b'form-data; name="%s"' % name
        if filename is not None:
            disposition += b'; filename="%s"\r\nContent-Type: application/octet-stream' % filename
        out += b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


class FakeUpstreamTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.upstream = FakeUpstream(reactor=self.clock)
        self.client = StubTreq(self.upstream)

    def request(self, method, path, key="sk-test", headers=None, **kwargs):
        headers = dict(headers or {})
        if key is not None:
            headers["authorization"] = "Bearer " + key
        d = self.client.request(method, URL + path, headers=headers, **kwargs)
        self.client.flush()
        return self.successResultOf(d)

    def body(self, response):
        d = response.content()
        self.client.flush()
        return self.successResultOf(d)

    def json(self, response):
        return json.loads(self.body(response))

    def chat(self, content="hello there big world", headers=None, **fields):
        payload = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], **fields}
        return self.request("POST", "/v1/chat/completions", json=payload, headers=headers, unbuffered=True)

    def start_reading(self, response):
        """Collect the body as it arrives; returns (chunks, deferred of the end)."""
        chunks = []
        done = treq.collect(response, chunks.append)
        self.client.flush()
        return chunks, done

    def test_models(self):
        response = self.request("GET", "/v1/models")
        listing = self.json(response)
        self.assertEqual(listing["object"], "list")
        self.assertEqual(
            listing["data"][0], {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "fake"}
        )
        self.assertEqual(self.json(self.request("GET", "/v1/models/gpt-4o"))["id"], "gpt-4o")
        missing = self.request("GET", "/v1/models/nope")
        self.assertEqual(missing.code, 404)
        self.assertEqual(self.json(missing)["error"]["code"], "model_not_found")

    def test_chat_echoes_last_user_message(self):
        messages = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second question"}]},
        ]
        response = self.request("POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": messages})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("x-request-id"), ["req_1"])
        self.assertEqual(response.headers.getRawHeaders("x-ratelimit-remaining-requests"), ["9999"])
        self.assertTrue(response.headers.hasHeader("openai-processing-ms"))
        completion = self.json(response)
        self.assertEqual(completion["object"], "chat.completion")
        self.assertEqual(completion["model"], "gpt-4o")
        choice = completion["choices"][0]
        self.assertEqual(choice["message"]["role"], "assistant")
        self.assertEqual(choice["message"]["content"], "echo: second question")
        self.assertEqual(choice["finish_reason"], "stop")
        self.assertEqual(completion["usage"], {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9})

    def test_chat_stream_framing(self):
        response = self.chat(stream=True, stream_options={"include_usage": True})
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        body = self.body(response)
        self.assertTrue(body.endswith(b"\n\ndata: [DONE]\n\n"))
        events = sse_events(body)
        self.assertEqual(events[-1], b"[DONE]")
        chunks = [json.loads(event) for event in events[:-1]]
        self.assertEqual({chunk["object"] for chunk in chunks}, {"chat.completion.chunk"})
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        contents = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:6]]
        self.assertEqual(len(contents), 5)
        self.assertEqual("".join(contents), "echo: hello there big world")
        self.assertEqual(chunks[6]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(chunks[7]["choices"], [])
        self.assertEqual(chunks[7]["usage"]["completion_tokens"], 5)
        self.assertEqual(len(chunks), 8)

    def test_stream_chunks_follow_the_clock(self):
        response = self.chat(stream=True, headers={"x-fake-chunks": "3", "x-fake-interval": "2"})
        chunks, done = self.start_reading(response)
        expected_deltas = 1
        for _ in range(3):
            data = b"".join(chunks)
            deltas = [json.loads(e)["choices"][0]["delta"] for e in sse_events(data)]
            self.assertEqual(sum("content" in d and d["content"] != "" for d in deltas), expected_deltas)
            self.clock.advance(1.75)
            self.client.flush()
            self.assertEqual(b"".join(chunks), data, "a write came before its time")
            self.clock.advance(0.25)
            self.client.flush()
            expected_deltas += 1
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(self.clock.seconds(), 6)
        self.assertEqual(sse_events(b"".join(chunks))[-1], b"[DONE]")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_tool_call_stream_splits_arguments(self):
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        plain = self.json(self.chat(tools=tools))
        call = plain["choices"][0]["message"]["tool_calls"][0]
        self.assertEqual(plain["choices"][0]["finish_reason"], "tool_calls")
        self.assertEqual(call["function"]["name"], "lookup")

        events = sse_events(self.body(self.chat(tools=tools, stream=True, headers={"x-fake-chunks": "4"})))
        deltas = [json.loads(e)["choices"][0] for e in events[:-1]]
        opening = deltas[0]["delta"]["tool_calls"][0]
        self.assertEqual((opening["index"], opening["type"], opening["function"]["name"]), (0, "function", "lookup"))
        self.assertTrue(opening["id"].startswith("call_"))
        pieces = [d["delta"]["tool_calls"][0]["function"]["arguments"] for d in deltas[1:-1]]
        self.assertEqual(len(pieces), 4)
        self.assertTrue(all(pieces))
        self.assertEqual(json.loads("".join(pieces)), json.loads(call["function"]["arguments"]))
        self.assertEqual(deltas[-1]["finish_reason"], "tool_calls")

    def test_legacy_completions_embeddings_and_responses(self):
        plain = self.json(self.request("POST", "/v1/completions", json={"model": "m", "prompt": "say it"}))
        self.assertEqual(plain["choices"][0]["text"], "echo: say it")
        streamed = sse_events(self.body(self.request("POST", "/v1/completions", json={"prompt": "say it", "stream": True})))
        self.assertEqual("".join(json.loads(e)["choices"][0]["text"] for e in streamed[:-1]), "echo: say it")

        floats = self.json(self.request("POST", "/v1/embeddings", json={"input": ["a", "b"]}))
        packed = self.json(self.request("POST", "/v1/embeddings", json={"input": ["a", "b"], "encoding_format": "base64"}))
        self.assertEqual([d["index"] for d in floats["data"]], [0, 1])
        self.assertNotEqual(floats["data"][0]["embedding"], floats["data"][1]["embedding"])
        decoded = struct.unpack("<8f", base64.b64decode(packed["data"][1]["embedding"]))
        self.assertEqual(list(decoded), floats["data"][1]["embedding"])

        answer = self.json(self.request("POST", "/v1/responses", json={"model": "m", "input": "hi you"}))
        self.assertEqual(answer["output"][0]["content"][0], {"type": "output_text", "text": "echo: hi you", "annotations": []})
        self.assertEqual(answer["usage"]["total_tokens"], 5)
        body = self.body(self.request("POST", "/v1/responses", json={"input": "hi you", "stream": True}))
        events = [e.split(b"\ndata: ") for e in body[:-2].split(b"\n\n")]
        names = [name.removeprefix(b"event: ").decode() for name, _ in events]
        self.assertEqual(names[0], "response.created")
        self.assertEqual(names[-1], "response.completed")
        deltas = [json.loads(data) for name, data in events if name == b"event: response.output_text.delta"]
        self.assertEqual(len(deltas), 5)
        self.assertEqual("".join(d["delta"] for d in deltas), "echo: hi you")
        self.assertEqual(json.loads(events[-1][1])["response"]["output"][0]["content"][0]["text"], "echo: hi you")

    def test_multipart_uploads_are_hashed_byte_exact(self):
        payload = bytes(range(256)) + b"\r\n--" + BOUNDARY[:-1] + b"\r\n\r\n"
        body = multipart([(b"purpose", None, b"fine-tune"), (b"file", b"data.jsonl", payload)])
        headers = {"content-type": "multipart/form-data; boundary=" + BOUNDARY.decode()}
        uploaded = self.json(self.request("POST", "/v1/files", data=body, headers=headers))
        self.assertEqual(uploaded["object"], "file")
        self.assertEqual(uploaded["filename"], "data.jsonl")
        self.assertEqual(uploaded["purpose"], "fine-tune")
        self.assertEqual(uploaded["bytes"], len(payload))
        self.assertEqual(uploaded["sha256"], hashlib.sha256(payload).hexdigest())
        self.assertEqual(uploaded["fields"], {"purpose": "fine-tune"})

        audio = multipart([(b"model", None, b"whisper-1"), (b"file", b"a.wav", payload)])
        heard = self.json(self.request("POST", "/v1/audio/transcriptions", data=audio, headers=headers))
        self.assertEqual((heard["bytes"], heard["sha256"]), (len(payload), hashlib.sha256(payload).hexdigest()))
        self.assertIn("a.wav", heard["text"])
        broken = self.request("POST", "/v1/files", data=body[:-10], headers=headers)
        self.assertEqual(broken.code, 400)

    def test_anything_else_is_echoed(self):
        response = self.request("PUT", "/any/thing?x=1&y=%2F", data=b"payload", headers={"x-custom": "v"})
        echo = self.json(response)
        self.assertEqual(echo["method"], "PUT")
        self.assertEqual(echo["path"], "/any/thing?x=1&y=%2F")
        self.assertIn(["X-Custom", "v"], echo["headers"])
        self.assertEqual((echo["body_length"], echo["body_sha256"]), (7, hashlib.sha256(b"payload").hexdigest()))
        head = self.request("HEAD", "/v1/models/gpt-4o?q")
        self.assertEqual(head.code, 200)
        self.assertEqual(self.body(head), b"")
        self.assertEqual(head.headers.getRawHeaders("x-request-id"), ["req_2"])

    def test_key_status_and_expected_keys(self):
        self.upstream.key_status["sk-limited"] = (429, 2.0)
        self.upstream.key_status["sk-revoked"] = (401, None)
        limited = self.request("GET", "/v1/models", key="sk-limited")
        self.assertEqual(limited.code, 429)
        self.assertEqual(limited.headers.getRawHeaders("retry-after"), ["2"])
        self.assertEqual(self.json(limited)["error"]["code"], "rate_limit_exceeded")
        revoked = self.request("GET", "/v1/models", key="sk-revoked")
        self.assertEqual(revoked.code, 401)
        self.assertIsNone(revoked.headers.getRawHeaders("retry-after"))
        self.assertEqual(
            set(self.json(revoked)["error"]), {"message", "type", "param", "code"}
        )
        self.assertEqual(self.json(revoked)["error"]["code"], "invalid_api_key")

        changed = self.request("POST", "/__fake/keys", json={"sk-limited": None, "sk-new": {"status": 503, "retry_after": 1.5}})
        self.assertEqual(self.json(changed)["sk-new"], {"status": 503, "retry_after": 1.5})
        self.assertEqual(self.request("GET", "/v1/models", key="sk-limited").code, 200)
        self.assertEqual(self.request("GET", "/v1/models", key="sk-new").headers.getRawHeaders("retry-after"), ["1.5"])

        self.upstream.expected_keys = {"sk-good"}
        self.assertEqual(self.request("GET", "/v1/models", key="sk-other").code, 401)
        self.assertEqual(self.request("GET", "/v1/models", key=None, headers={"api-key": "sk-good"}).code, 200)
        self.assertEqual(self.upstream.received[-1].key, "sk-good")

    def test_fake_status(self):
        response = self.request("POST", "/v1/chat/completions", json={}, headers={"x-fake-status": "503", "x-fake-retry-after": "7"})
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["7"])
        self.assertEqual(self.json(response)["error"]["type"], "server_error")
        self.assertEqual(self.request("GET", "/x", headers={"x-fake-chunks": "0"}).code, 400)

    def test_recording_and_control_endpoints(self):
        self.request("POST", "/v1/embeddings?api-version=1", json={"input": "x"}, headers={"x-trace": "t1"})
        self.request("GET", "/__fake/received")
        [record] = self.upstream.received
        self.assertEqual((record.method, record.uri, record.key), (b"POST", b"/v1/embeddings?api-version=1", "sk-test"))
        self.assertEqual(record.header("X-TRACE"), b"t1")
        self.assertEqual(record.json(), {"input": "x"})
        self.assertEqual(record.request_id, "req_1")
        [listed] = self.json(self.request("GET", "/__fake/received"))
        self.assertEqual(base64.b64decode(listed["body_base64"]), record.body)
        self.assertEqual(listed["body_sha256"], hashlib.sha256(record.body).hexdigest())
        self.request("POST", "/__fake/reset")
        self.assertEqual(self.upstream.received, [])

    def test_disconnect_before_headers_is_counted(self):
        d = self.client.get(URL + "/v1/models", headers={"x-fake-fail": "hang-before-headers"})
        self.client.flush()
        self.assertNoResult(d)
        self.assertEqual(self.upstream.disconnects, 0)
        d.cancel()
        self.client.flush()
        self.failureResultOf(d, CancelledError, ResponseNeverReceived)
        self.assertEqual(self.upstream.disconnects, 1)

    def test_disconnect_mid_stream_cancels_timer(self):
        response = self.chat(stream=True, headers={"x-fake-interval": "1"})

        class HangUp(Protocol):
            def dataReceived(self, data):
                self.transport.stopProducing()

        response.deliverBody(HangUp())
        self.client.flush()
        self.assertEqual(self.upstream.disconnects, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hang_mid_stream(self):
        response = self.chat(stream=True, headers={"x-fake-fail": "hang-mid-stream"})
        chunks, done = self.start_reading(response)
        self.clock.advance(3600)
        self.client.flush()
        self.assertNoResult(done)
        self.assertEqual(len(sse_events(b"".join(chunks))), 2)

    def test_reset_and_close_are_not_counted_as_disconnects(self):
        response = self.chat(stream=True, headers={"x-fake-fail": "reset-mid-stream"})
        chunks, done = self.start_reading(response)
        self.failureResultOf(done, ResponseFailed)
        contents = [json.loads(e)["choices"][0]["delta"]["content"] for e in sse_events(b"".join(chunks))]
        self.assertEqual(contents, ["", "echo: ", "hello "])
        d = self.client.get(URL + "/v1/models", headers={"x-fake-fail": "close-before-headers"})
        self.client.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.upstream.disconnects, 0)

    def test_bytes_are_produced_as_the_reader_drains(self):
        size = 1_000_000

        class SlowTransport(StringTransport):
            """Pauses its producer past 100 kB unread, as a socket's buffer would."""

            def write(self, data):
                super().write(data)
                if len(self.value()) > 100_000 and self.producerState == "producing":
                    self.producerState = "paused"
                    self.producer.pauseProducing()

        channel = Site(self.upstream, reactor=Clock()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = SlowTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /big HTTP/1.1\r\nHost: upstream\r\nx-fake-bytes: %d\r\n\r\n" % size)
        received, rounds = b"", 0
        while transport.producerState == "paused":
            self.assertLess(len(transport.value()), 100_000 + 65536 + 1000)
            received += transport.value()
            transport.clear()
            rounds += 1
            transport.producerState = "producing"
            transport.producer.resumeProducing()
        received += transport.value()
        head, body = received.split(b"\r\n\r\n", 1)
        self.assertIn(b"Content-Length: %d" % size, head)
        self.assertEqual(body, (bytes(range(256)) * (size // 256 + 1))[:size])
        self.assertGreater(rounds, 5)


@settings(max_examples=50, deadline=None)
@given(payload=st.binary(max_size=300), purpose=st.text(max_size=20))
def test_parse_multipart_matches_httpx_encoding(payload, purpose):
    request = httpx2.Request(
        "POST", "http://upstream.test/", files={"file": ("f.bin", payload)}, data={"purpose": purpose}
    )
    parts = parse_multipart(request.headers["content-type"], request.read())
    assert [(p.name, p.filename, p.data) for p in parts] == [
        ("purpose", None, purpose.encode("utf-8")),
        ("file", "f.bin", payload),
    ]


@pytest.mark.slow
def test_openai_sdk_against_subprocess():
    audio = bytes(range(256)) * 40
    with FakeUpstreamProcess(key_status={"sk-limited": (429, 7)}, timeout=10) as upstream:
        with openai.OpenAI(base_url=upstream.url + "/v1", api_key="sk-test", timeout=5, max_retries=0) as client:
            assert "gpt-4o-mini" in [model.id for model in client.models.list()]
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi from the sdk"}],
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-fake-chunks": "3"},
            )
            chunks = list(stream)
            deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
            assert deltas and "".join(deltas) == "echo: hi from the sdk"
            assert len(deltas) == 3
            assert chunks[-1].usage.total_tokens == 9
            heard = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", audio))
            assert heard.model_extra["sha256"] == hashlib.sha256(audio).hexdigest()
        with openai.OpenAI(base_url=upstream.url + "/v1", api_key="sk-limited", timeout=5, max_retries=0) as limited:
            with pytest.raises(openai.RateLimitError) as caught:
                limited.models.list()
            assert caught.value.response.headers["retry-after"] == "7"
        records = upstream.received()
        assert [(r["method"], r["uri"].split("?")[0], r["key"]) for r in records] == [
            ("GET", "/v1/models", "sk-test"),
            ("POST", "/v1/chat/completions", "sk-test"),
            ("POST", "/v1/audio/transcriptions", "sk-test"),
            ("GET", "/v1/models", "sk-limited"),
        ]
        assert json.loads(base64.b64decode(records[1]["body_base64"]))["stream"] is True
        upstream.reset()
        assert upstream.received() == []
