"""The Realtime API over WebSocket, its pure parts: the upgrade's offer and headers and what a session's events say
(fwd.realtime), a session's transcript (fwd.transcripts.realtime), its Azure target (fwd.azure) and an upstream's
refusal of the upgrade (fwd.websocket)."""

from __future__ import annotations

import base64
import json
import signal
from contextlib import contextmanager

import orjson
import pytest

from fwd.azure import Unmapped, azure_target
from fwd.realtime import (
    client_event_id,
    echoed,
    error_event,
    handshake_headers,
    is_upgrade,
    model_refusal,
    offered,
    passed_on,
    response_usage,
    socket_url,
    subprotocol_key,
    tokens_of,
)
from fwd.transcripts.realtime import SessionTranscript
from fwd.usage import Usage
from fwd.websocket import REFUSAL_LIMIT, WAIT, Refused, dechunked, refusal_in


def event(**fields) -> bytes:
    return orjson.dumps(fields)


# --- the upgrade request --------------------------------------------------------------------------------------


def test_an_upgrade_is_a_get_asking_for_websocket_with_the_upgrade_option():
    assert is_upgrade(b"GET", [b"WebSocket"], [b"keep-alive, Upgrade"])
    assert is_upgrade(b"GET", [b"websocket"], [b"keep-alive", b"upgrade"])


@pytest.mark.parametrize("method,upgrade,connection", [
    (b"POST", [b"websocket"], [b"upgrade"]),
    (b"GET", None, [b"upgrade"]),
    (b"GET", [b"websocket"], None),
    (b"GET", [b"h2c"], [b"upgrade"]),
    (b"GET", [b"websocket"], [b"keep-alive"]),
])
def test_anything_less_is_not_an_upgrade(method, upgrade, connection):
    assert not is_upgrade(method, upgrade, connection)


def test_header_tokens_are_split_trimmed_and_lowered():
    assert tokens_of([b"Keep-Alive,  Upgrade", b" , X"]) == ["keep-alive", "upgrade", "x"]
    assert tokens_of(None) == []


def test_offered_subprotocols_keep_their_order_and_case():
    values = [b"realtime, openai-insecure-api-key.sk-AbC", b"openai-beta.realtime-v1"]
    assert offered(values) == ["realtime", "openai-insecure-api-key.sk-AbC", "openai-beta.realtime-v1"]
    assert offered(None) == []


def test_a_browser_key_is_read_from_its_subprotocol():
    assert subprotocol_key(["realtime", "openai-insecure-api-key.sk-AbC"]) == ("sk-AbC", None)
    assert subprotocol_key(["realtime"]) == (None, None)


def test_the_same_key_offered_twice_is_one_key():
    key = "openai-insecure-api-key.sk-a"
    assert subprotocol_key([key, "realtime", key]) == ("sk-a", None)


def test_two_different_keys_are_refused():
    key, why = subprotocol_key(["openai-insecure-api-key.sk-a", "openai-insecure-api-key.sk-b"])
    assert key is None
    assert why == "the subprotocols carry more than one key"


def test_an_empty_key_is_no_key():
    assert subprotocol_key(["realtime", "openai-insecure-api-key."]) == (None, None)
    assert subprotocol_key(["openai-insecure-api-key.", "openai-insecure-api-key.sk-a"])[1] is not None


def test_the_upstream_is_never_offered_the_subprotocol_that_carried_a_key():
    protocols = ["realtime", "openai-insecure-api-key.sk-a", "openai-beta.realtime-v1"]
    assert passed_on(protocols) == ["realtime", "openai-beta.realtime-v1"]


def test_the_client_gets_realtime_back_only_when_it_offered_it():
    assert echoed(["openai-insecure-api-key.sk-a", "realtime"]) == "realtime"
    assert echoed(["openai-beta.realtime-v1"]) is None
    assert echoed([]) is None


@pytest.mark.parametrize("url,expected", [
    (b"http://127.0.0.1:8080/v1/realtime?model=m", "ws://127.0.0.1:8080/v1/realtime?model=m"),
    (b"https://api.openai.com/v1/realtime?model=m", "wss://api.openai.com/v1/realtime?model=m"),
])
def test_the_upstream_socket_url_follows_the_http_scheme(url, expected):
    assert socket_url(url) == expected


@pytest.mark.parametrize("url", [b"ftp://example.com/x", b"ws://example.com/x", b"example.com/x"])
def test_only_http_and_https_upstreams_have_a_socket_url(url):
    with pytest.raises(ValueError):
        socket_url(url)


HEADERS = [
    (b"Host", [b"api.openai.com"]),
    (b"Upgrade", [b"websocket"]),
    (b"Connection", [b"Upgrade"]),
    (b"Sec-WebSocket-Key", [b"dGhlIHNhbXBsZSBub25jZQ=="]),
    (b"Sec-WebSocket-Version", [b"13"]),
    (b"Sec-WebSocket-Protocol", [b"realtime"]),
    (b"Sec-WebSocket-Extensions", [b"permessage-deflate"]),
    (b"Pragma", [b"no-cache"]),
    (b"Cache-Control", [b"no-cache"]),
    (b"Authorization", [b"Bearer sk-pool"]),
    (b"OpenAI-Beta", [b"realtime=v1"]),
    (b"User-Agent", [b"openai-python/1.0"]),
    (b"Origin", [b"https://app.example"]),
]


def test_the_upstream_handshake_drops_the_clients_handshake_headers():
    headers, _, _ = handshake_headers(HEADERS)
    assert headers == {"Authorization": "Bearer sk-pool", "OpenAI-Beta": "realtime=v1"}


def test_the_user_agent_and_origin_are_given_apart():
    headers, agent, origin = handshake_headers(HEADERS)
    assert (agent, origin) == ("openai-python/1.0", "https://app.example")
    assert handshake_headers([(b"Authorization", [b"Bearer k"])])[1:] == (None, None)


def test_several_values_of_a_header_are_joined():
    assert handshake_headers([(b"X-Tag", [b"a", b"b"])])[0] == {"X-Tag": "a, b"}


def test_a_header_that_is_not_ascii_is_dropped():
    latin = "caf\u00e9".encode("latin-1")
    headers, agent, _ = handshake_headers([(b"X-Name", [latin]), (b"User-Agent", [latin]), (b"X-Ok", [b"1"])])
    assert headers == {"X-Ok": "1"}
    assert agent is None


# --- usage, models and errors in the session's events -----------------------------------------------------------


def done(usage, status="completed") -> bytes:
    return event(type="response.done", event_id="e", response={"id": "resp_1", "status": status, "usage": usage})


def test_the_usage_of_a_response_done_is_read():
    used = response_usage(done({"total_tokens": 15, "input_tokens": 10, "output_tokens": 5,
                                "input_token_details": {"audio_tokens": 4}}))
    assert used == Usage(10, 5, 15)


@pytest.mark.parametrize("payload", [
    event(type="response.created", response={"id": "r", "usage": {"input_tokens": 1, "output_tokens": 1}}),
    event(type="response.output_text.delta", response_id="r", delta="response.done",
          usage={"input_tokens": 1, "output_tokens": 1}),
    b'{"type":"response.done","response":{"usage":{"input_tokens":1',
    done(None, status="cancelled"),
    b'["response.done"]',
])
def test_no_other_frame_reports_usage(payload):
    assert response_usage(payload) is None


def test_negative_and_boolean_counts_are_ignored():
    assert response_usage(done({"input_tokens": -1, "output_tokens": True, "total_tokens": 7})) == Usage(0, 0, 7)
    assert response_usage(done({"input_tokens": -1, "output_tokens": False, "total_tokens": "9"})) is None


def test_a_missing_total_is_the_sum():
    assert response_usage(done({"input_tokens": 3, "output_tokens": 4})) == Usage(3, 4, 7)
    assert response_usage(done({"input_tokens": 3, "output_tokens": 4, "total_tokens": -1})) == Usage(3, 4, 7)


ALLOWED = frozenset({"gpt-realtime-mini"})


@pytest.mark.parametrize("payload", [
    event(type="session.update", session={"type": "realtime", "model": "gpt-realtime"}),
    event(type="response.create", response={"model": "gpt-realtime", "instructions": "hi"}),
    event(type="session.update", session={"model": None}),
])
def test_an_event_naming_a_model_the_key_may_not_use_is_refused(payload):
    why = model_refusal(payload, ALLOWED)
    assert why is not None and "model" in why


def test_the_refusal_names_the_model():
    assert "'gpt-realtime'" in model_refusal(event(type="session.update", session={"model": "gpt-realtime"}), ALLOWED)


@pytest.mark.parametrize("payload", [
    event(type="session.update", session={"model": "gpt-realtime-mini"}),
    event(type="session.update", session={"instructions": "Talk about models."}),
    event(type="response.create"),
    event(type="conversation.item.create", item={"type": "message", "role": "user",
                                                 "content": [{"type": "input_text", "text": "which model are you?"}]}),
    event(type="input_audio_buffer.append", audio="AAAA"),
    b'["model"]',
])
def test_events_naming_no_forbidden_model_pass(payload):
    assert model_refusal(payload, ALLOWED) is None


def test_an_invalid_event_mentioning_a_model_is_refused():
    assert model_refusal(b'{"type":"session.update","session":{"model":"gpt-realtime"', ALLOWED) is not None
    assert model_refusal(b'not json', ALLOWED) is None  # mentions no model: the upstream answers it


def test_a_model_named_with_an_escaped_member_name_is_refused_too():
    payload = b'{"type":"session.update","session":{"mod\\u0065l":"gpt-realtime"}}'
    assert orjson.loads(payload)["session"] == {"model": "gpt-realtime"}
    assert model_refusal(payload, ALLOWED) is not None


def test_a_model_anywhere_in_an_event_is_checked_whatever_its_type():
    assert model_refusal(b'{"type":["session.update"],"model":"x"}', ALLOWED) is not None
    assert model_refusal(b'{"type":["session.update"],"model":"gpt-realtime-mini"}', ALLOWED) is None


@pytest.mark.parametrize("payload", [
    event(type="session.update", session={"input_audio_transcription": {"model": "whisper-1"}}),
    event(type="session.update", session={"audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}),
    event(type="transcription_session.update", session={"input_audio_transcription": {"model": "whisper-1"}}),
])
def test_a_transcription_model_is_a_model_the_key_makes_the_upstream_run(payload):
    assert model_refusal(payload, ALLOWED) is not None


def test_binary_frames_are_checked_when_they_are_json_and_pass_when_they_are_audio():
    json_event = event(type="session.update", session={"model": "gpt-realtime"})
    assert model_refusal(json_event, ALLOWED, binary=True) is not None
    assert model_refusal(b"\x00model\\\xff" * 10, ALLOWED, binary=True) is None


def test_an_event_nested_too_deeply_to_read_is_refused():
    deep = b'{"type":"session.update","session":' + b'{"a":' * 100 + b'1' + b'}' * 100 + b'}'
    assert model_refusal(deep.replace(b'"a"', b'"model_x"', 1), ALLOWED) is not None


def test_an_error_event_has_the_realtime_error_shape():
    sent = orjson.loads(error_event("this key may not use the model 'm'", "model_not_allowed", "evt_7"))
    assert sent["type"] == "error"
    assert isinstance(sent["event_id"], str) and sent["event_id"]
    assert sent["error"]["type"] == "invalid_request_error"
    assert sent["error"]["code"] == "model_not_allowed"
    assert sent["error"]["message"] == "this key may not use the model 'm'"
    assert sent["error"]["event_id"] == "evt_7"
    assert orjson.loads(error_event("m", "c"))["error"]["event_id"] is None


def test_the_clients_event_id_is_read_when_it_gave_one():
    assert client_event_id(event(type="session.update", event_id="evt_1")) == "evt_1"
    for payload in (event(type="session.update"), event(type="x", event_id=5), b"[1]", b"{not json"):
        assert client_event_id(payload) is None


# --- a session's transcript ------------------------------------------------------------------------------------

AUDIO_IN = bytes((i * 7 + 3) % 256 for i in range(4801))
AUDIO_OUT = bytes((i * 13 + 5) % 256 for i in range(2400))
B64_IN = base64.b64encode(AUDIO_IN).decode()
B64_OUT = base64.b64encode(AUDIO_OUT).decode()


def transcript(limit: int | None = None) -> SessionTranscript:
    extra = {} if limit is None else {"limit": limit}
    return SessionTranscript(uid="u1", time=1_700_000_000.25, client="127.0.0.1", caller="fk:alice",
                             route="/", path="/v1/realtime", model="gpt-realtime", **extra)


def response_done(response_id: str, usage: dict) -> bytes:
    return event(type="response.done", event_id="e", response={
        "id": response_id, "object": "realtime.response", "status": "completed", "output": [], "usage": usage})


CONVERSATION = [
    ("client", event(type="session.update", event_id="evt_1",
                     session={"type": "realtime", "instructions": "Be brief.", "output_modalities": ["audio"]})),
    ("upstream", event(type="session.created", event_id="e1",
                       session={"id": "sess_1", "object": "realtime.session", "model": "gpt-realtime-2025-08-28",
                                "instructions": "You are helpful."})),
    ("upstream", event(type="session.updated", event_id="e2",
                       session={"id": "sess_1", "object": "realtime.session", "model": "gpt-realtime-2025-08-28",
                                "instructions": "Be brief."})),
    ("client", event(type="conversation.item.create", item={
        "id": "item_u1", "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]})),
    ("client", event(type="response.create")),
    ("upstream", event(type="response.created", event_id="e3",
                       response={"id": "resp_1", "object": "realtime.response", "status": "in_progress",
                                 "output": [], "usage": None})),
    ("upstream", event(type="response.output_item.added", event_id="e4", response_id="resp_1", output_index=0,
                       item={"id": "item_f1", "type": "function_call", "status": "in_progress",
                             "call_id": "call_1", "name": "get_weather", "arguments": ""})),
    ("upstream", event(type="response.function_call_arguments.delta", event_id="e5", response_id="resp_1",
                       item_id="item_f1", output_index=0, call_id="call_1", delta='{"city":')),
    ("upstream", event(type="response.function_call_arguments.delta", event_id="e6", response_id="resp_1",
                       item_id="item_f1", output_index=0, call_id="call_1", delta='"Paris"}')),
    ("upstream", response_done("resp_1", {"total_tokens": 30, "input_tokens": 20, "output_tokens": 10})),
    ("client", event(type="conversation.item.create", item={
        "type": "function_call_output", "call_id": "call_1", "output": '{"temp_c":21}'})),
    ("client", event(type="input_audio_buffer.append", audio=B64_IN)),
    ("client", event(type="input_audio_buffer.append", audio=B64_IN)),
    ("client", event(type="input_audio_buffer.commit")),
    ("upstream", event(type="input_audio_buffer.committed", event_id="e7", previous_item_id="item_f1",
                       item_id="item_a1")),
    ("upstream", event(type="conversation.item.input_audio_transcription.completed", event_id="e8",
                       item_id="item_a1", content_index=0, transcript="And tomorrow?")),
    ("client", event(type="response.create")),
    ("upstream", event(type="response.created", event_id="e9",
                       response={"id": "resp_2", "status": "in_progress", "output": [], "usage": None})),
    ("upstream", event(type="response.output_audio.delta", response_id="resp_2", item_id="item_r2",
                       delta=B64_OUT)),
    ("upstream", event(type="response.output_audio_transcript.delta", response_id="resp_2", item_id="item_r2",
                       delta="Tomorrow ")),
    ("upstream", event(type="response.output_audio.delta", response_id="resp_2", item_id="item_r2",
                       delta=B64_OUT)),
    ("upstream", event(type="response.output_audio_transcript.delta", response_id="resp_2", item_id="item_r2",
                       delta="it rains.")),
    ("upstream", event(type="response.output_text.delta", response_id="resp_2", item_id="item_r2",
                       delta="Rain ")),
    ("upstream", event(type="response.output_text.delta", response_id="resp_2", item_id="item_r2",
                       delta="tomorrow.")),
    ("upstream", response_done("resp_2", {"total_tokens": 65, "input_tokens": 40, "output_tokens": 25})),
    ("upstream", event(type="error", event_id="e10", error={
        "type": "invalid_request_error", "code": "invalid_value", "message": "Unknown parameter",
        "param": "session.foo", "event_id": "evt_9"})),
]


def feed(session: SessionTranscript, frames) -> SessionTranscript:
    for side, payload in frames:
        (session.from_client if side == "client" else session.from_upstream)(payload, False)
    return session


def record_of(frames=CONVERSATION, **finished) -> dict:
    session = feed(transcript(), frames)
    session.closed("client", 1000, "bye")
    return session.finish(**{"partial": False, "error": None, "latency_ms": 1234.56789, **finished})


def test_the_conversation_is_recorded_in_order():
    items = record_of()["items"]
    assert [(i["from"], i["type"]) for i in items] == [
        ("client", "message"), ("upstream", "response"), ("client", "function_call_output"),
        ("client", "input_audio"), ("upstream", "response")]
    assert items[0] == {"from": "client", "role": "user", "type": "message", "item_id": "item_u1",
                        "text": "What is the weather in Paris?"}
    assert items[2] == {"from": "client", "type": "function_call_output", "call_id": "call_1",
                        "output": '{"temp_c":21}'}


def test_a_function_call_is_recorded_with_its_name_and_whole_arguments():
    first = record_of()["items"][1]
    assert first["response_id"] == "resp_1" and first["status"] == "completed"
    assert first["tool_calls"] == [{"call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'}]


def test_committed_audio_is_a_size_with_the_transcription_of_it():
    spoken = record_of()["items"][3]
    assert spoken == {"from": "client", "role": "user", "type": "input_audio", "item_id": "item_a1",
                      "audio_bytes": 2 * len(AUDIO_IN), "transcript": "And tomorrow?"}


def test_a_responses_text_and_audio_transcript_are_assembled_and_its_audio_counted():
    answer = record_of()["items"][4]
    assert answer["text"] == "Rain tomorrow."
    assert answer["transcript"] == "Tomorrow it rains."
    assert answer["audio_bytes"] == 2 * len(AUDIO_OUT)
    assert answer["usage"] == {"input_tokens": 40, "output_tokens": 25, "total_tokens": 65}


def test_the_beta_event_names_are_read_as_the_ga_ones():
    beta_names = {"response.output_audio.delta": "response.audio.delta",
                  "response.output_audio_transcript.delta": "response.audio_transcript.delta",
                  "response.output_text.delta": "response.text.delta"}
    beta = []
    for side, payload in CONVERSATION:
        parsed = orjson.loads(payload)
        if parsed["type"] in beta_names:
            payload = orjson.dumps({**parsed, "type": beta_names[parsed["type"]]})
        beta.append((side, payload))
    assert beta != CONVERSATION
    assert record_of(beta)["items"] == record_of()["items"]


def test_audio_is_counted_per_side_as_decoded_bytes():
    assert record_of()["audio_bytes"] == {"client": 2 * len(AUDIO_IN), "upstream": 2 * len(AUDIO_OUT)}


def test_binary_frames_count_as_audio_whole():
    session = transcript()
    session.from_client(b"\x01" * 100, True)
    session.from_upstream(b"\x02" * 30, True)
    record = session.finish(partial=False, error=None, latency_ms=1)
    assert record["audio_bytes"] == {"client": 100, "upstream": 30}
    assert record["frames"] == {"client": 1, "upstream": 1}
    assert record["items"] == [] and record["parse_error"] is None


def test_no_audio_is_kept_in_the_record():
    spoken = event(type="conversation.item.create", item={
        "id": "item_u2", "type": "message", "role": "user",
        "content": [{"type": "input_audio", "audio": B64_IN, "transcript": "Hello"}]})
    record = record_of([*CONVERSATION, ("client", spoken)])
    assert record["items"][-1]["audio_bytes"] == len(AUDIO_IN)
    assert record["items"][-1]["transcript"] == "Hello"
    dumped = json.dumps(record)
    assert B64_IN[:64] not in dumped and B64_OUT[:64] not in dumped


def test_audio_in_a_created_item_counts_as_audio_the_client_sent():
    spoken = event(type="conversation.item.create", item={
        "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": B64_IN}]})
    session = feed(transcript(), [("client", spoken)])
    assert session.finish(partial=False, error=None, latency_ms=1)["audio_bytes"]["client"] == len(AUDIO_IN)


def test_usage_is_summed_over_the_responses():
    record = record_of()
    assert record["responses"] == 2
    assert record["usage"] == {"input_tokens": 60, "output_tokens": 35, "total_tokens": 95}


def test_a_session_without_response_done_has_no_usage():
    assert record_of(CONVERSATION[:5])["usage"] is None


def test_frames_are_counted_per_side():
    clients = sum(side == "client" for side, _ in CONVERSATION)
    assert record_of()["frames"] == {"client": clients, "upstream": len(CONVERSATION) - clients}
    assert clients == 8


def test_the_session_is_the_one_the_upstream_confirmed_and_names_the_model():
    record = record_of()
    assert record["session"]["instructions"] == "Be brief." and record["session"]["id"] == "sess_1"
    assert record["model"] == "gpt-realtime-2025-08-28"


def test_before_the_upstream_confirms_the_session_is_the_one_asked_for():
    record = record_of(CONVERSATION[:1])
    assert record["session"] == {"type": "realtime", "instructions": "Be brief.", "output_modalities": ["audio"]}
    assert record["model"] == "gpt-realtime"


def test_upstream_errors_are_recorded():
    assert record_of()["upstream_errors"] == [{
        "type": "invalid_request_error", "code": "invalid_value", "message": "Unknown parameter",
        "param": "session.foo", "event_id": "evt_9"}]
    assert record_of(CONVERSATION[:3])["upstream_errors"] is None


def test_the_first_close_says_how_the_session_ended():
    session = transcript()
    session.closed("upstream", 1011, "")
    session.closed("client", 1000, "bye")
    assert session.finish(partial=True, error=None, latency_ms=1)["ended"] == {
        "by": "upstream", "code": 1011, "reason": None}
    assert record_of()["ended"] == {"by": "client", "code": 1000, "reason": "bye"}


def test_the_record_carries_the_outcome_it_was_finished_with():
    session = transcript()
    session.opened(101, 12.34567)
    record = session.finish(partial=True, error="the upstream went away", latency_ms=1234.56789)
    assert record["partial"] is True and record["error"] == "the upstream went away"
    assert (record["status"], record["latency_ms"], record["ttfb_ms"]) == (101, 1234.568, 12.346)
    assert (record["uid"], record["caller"], record["path"]) == ("u1", "fk:alice", "/v1/realtime")
    assert record["time"] == "2023-11-14T22:13:20.250Z"
    assert record["realtime"] is True and record["ended"] is None


def test_frames_that_are_not_events_are_counted_as_such():
    session = feed(transcript(), [("upstream", b"not json"), ("client", b"{oops"), *CONVERSATION[:4]])
    record = session.finish(partial=False, error=None, latency_ms=1)
    assert record["parse_error"] == "2 frames were not events"
    assert record["frames"] == {"client": 3, "upstream": 3}
    assert record["items"][0]["text"] == "What is the weather in Paris?"


def test_text_beyond_the_limit_is_cut_and_marked():
    session = transcript(limit=10)
    feed(session, [("upstream", event(type="response.created", response={"id": "r"})),
                   ("upstream", event(type="response.output_text.delta", response_id="r", delta="Hello, ")),
                   ("upstream", event(type="response.output_text.delta", response_id="r", delta="world!")),
                   ("upstream", event(type="response.output_text.delta", response_id="r", delta="More."))])
    record = session.finish(partial=False, error=None, latency_ms=1)
    assert record["items"][0]["text"] == "Hello, wor"
    assert record["truncated"] is True
    assert record_of()["truncated"] is False


def test_a_session_larger_than_the_limit_is_left_out():
    session = feed(transcript(limit=10), CONVERSATION[1:2])
    record = session.finish(partial=False, error=None, latency_ms=1)
    assert record["session"] is None and record["truncated"] is True


# --- the Azure target of a Realtime session ---------------------------------------------------------------------


def test_a_realtime_session_goes_to_its_deployment_without_the_model_parameter():
    deployments = {"gpt-4o-realtime": "rt-prod"}
    assert azure_target(b"v1/realtime", b"model=gpt-4o-realtime", "gpt-4o-realtime", deployments, "2025-04-01") == (
        b"openai/realtime", b"deployment=rt-prod&api-version=2025-04-01")


def test_an_unlisted_realtime_model_is_its_own_deployment_and_other_parameters_stay():
    path, query = azure_target(b"v1/realtime", b"a=1&Model=gpt-4o-realtime&b=2", "gpt-4o-realtime", {}, "v")
    assert (path, query) == (b"openai/realtime", b"a=1&b=2&deployment=gpt-4o-realtime&api-version=v")


def test_a_realtime_clients_own_api_version_is_kept():
    _, query = azure_target(b"v1/realtime", b"api-version=2024-10-01-preview&model=m", "m", {}, "2025-04-01")
    assert query == b"api-version=2024-10-01-preview&deployment=m"


def test_a_realtime_deployment_name_is_percent_quoted():
    _, query = azure_target(b"v1/realtime", None, "a b/c&api-version=x", {}, "v")
    assert query == b"deployment=a%20b%2Fc%26api-version%3Dx&api-version=v"


@pytest.mark.parametrize("model", [None, ""])
def test_a_realtime_session_without_a_model_cannot_be_mapped(model):
    with pytest.raises(Unmapped):
        azure_target(b"v1/realtime", b"foo=1", model, {}, "v")


# --- an upstream's refusal of the upgrade -----------------------------------------------------------------------

UNAUTHORIZED = b'{"error":{"message":"Incorrect API key provided","code":"invalid_api_key"}}'


def head(status: bytes, *headers: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def test_a_101_is_left_to_the_websocket_handshake():
    switching = head(b"101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade")
    assert refusal_in(switching, closed=False) is None
    assert refusal_in(b"garbage\r\n\r\n", closed=False) is None


def test_an_incomplete_head_is_waited_for_until_the_connection_closes():
    partial = b"HTTP/1.1 401 Unauthorized\r\nContent-Type: appl"
    assert refusal_in(partial, closed=False) is WAIT
    assert refusal_in(partial, closed=True) is None


def test_a_refusal_with_its_whole_body_is_read():
    data = head(b"401 Unauthorized", b"Content-Type: application/json",
                b"Content-Length: %d" % len(UNAUTHORIZED), b"X-Request-ID: req_1") + UNAUTHORIZED
    refused = refusal_in(data, closed=False)
    assert isinstance(refused, Refused)
    assert (refused.status, refused.phrase, refused.body) == (401, b"Unauthorized", UNAUTHORIZED)
    assert refused.header(b"content-type") == [b"application/json"]
    assert refused.header(b"x-request-id") == [b"req_1"]
    assert all(isinstance(name, bytes) and name == name.lower() for name, _ in refused.headers)


def test_a_refusals_body_ends_at_its_content_length():
    data = head(b"429 Too Many Requests", b"Content-Length: 5") + b"hello, and more"
    assert refusal_in(data, closed=False).body == b"hello"


def test_a_refusals_incomplete_body_is_waited_for_unless_the_connection_closed():
    data = head(b"401 Unauthorized", b"Content-Length: %d" % len(UNAUTHORIZED)) + UNAUTHORIZED[:20]
    assert refusal_in(data, closed=False) is WAIT
    refused = refusal_in(data, closed=True)
    assert (refused.status, refused.body) == (401, UNAUTHORIZED[:20])


def test_a_body_without_a_length_ends_with_the_connection():
    data = head(b"404 Not Found") + b"no such route"
    assert refusal_in(data, closed=False) is WAIT
    assert refusal_in(data, closed=True).body == b"no such route"


def test_a_chunked_refusal_is_read_once_its_last_chunk_came():
    start = head(b"429 Too Many Requests", b"Transfer-Encoding: chunked", b"Retry-After: 2")
    assert refusal_in(start + b"5\r\nhello\r\n6\r\n wor", closed=False) is WAIT
    refused = refusal_in(start + b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n", closed=False)
    assert (refused.status, refused.body) == (429, b"hello world")
    assert refused.header(b"retry-after") == [b"2"]


def test_a_refusals_body_is_bounded():
    big = b"x" * (REFUSAL_LIMIT + 100)
    refused = refusal_in(head(b"500 Internal Server Error", b"Content-Length: %d" % len(big)) + big, closed=False)
    assert refused.body == b"x" * REFUSAL_LIMIT
    refused = refusal_in(head(b"500 Internal Server Error", b"Content-Length: 999999") + big[:REFUSAL_LIMIT],
                         closed=False)
    assert isinstance(refused, Refused) and len(refused.body) == REFUSAL_LIMIT


def test_dechunked_joins_the_chunks_or_waits_for_the_last():
    assert dechunked(b"3\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n") == b"abc0123456789"
    assert dechunked(b"3\r\nabc\r\n") is None
    assert dechunked(b"3\r\nab") is None
    assert dechunked(b"3\r\nabc\r\nzz\r\n") == b"abc"


@contextmanager
def deadline(seconds: float):
    def expired(*_):
        raise TimeoutError("still running")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_negative_chunk_size_ends_the_body():
    with deadline(0.2):
        assert dechunked(b"-64\r\nabc\r\n0\r\n\r\n") in (b"", None)


def test_the_autobahn_names_the_session_relies_on_are_still_there():
    """fwd.websocket and fwd.realtime_session use autobahn's protocol state beyond its callbacks: an autobahn
    upgrade that renames one must fail here, not in a session."""
    from autobahn.twisted.websocket import (
        WebSocketClientProtocol,
        WebSocketServerProtocol,
    )
    from autobahn.websocket import protocol

    for owner in (WebSocketClientProtocol, WebSocketServerProtocol):
        for name in ("processHandshake", "failHandshake", "dropConnection", "sendCloseFrame", "onCloseFrame",
                     "sendMessage", "STATE_OPEN"):
            assert hasattr(owner, name), f"{owner.__name__}.{name}"
    assert callable(protocol.parseHttpHeader)
    import inspect

    source = inspect.getsource(protocol)  # attributes set per connection, not on the class
    for name in ("data", "remoteCloseCode", "remoteCloseReason", "localCloseCode", "closedByMe", "wasNotCleanReason"):
        assert f"self.{name} =" in source, name
