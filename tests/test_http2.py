"""HTTP/2 against hostile clients: bounded header blocks, a deadline for every byte, no polling, JSON 400s.

In memory, an h2 client drives the proxy's real protocol over a StringTransport on a Clock.  Over TLS, a real
`twistd` takes a CONTINUATION flood and a client that never opens its flow-control window, measured from /proc.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
import tracemalloc
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, SettingsFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from fwd import errors, http2
from tests.support.memory import MemoryProxy
from tests.support.network import make_certificate
from tests.support.processes import DaemonProcess

REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"proxy.test"), (b":path", b"/v1/models")]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
IDLE = http2.IDLE_TIMEOUT_SECONDS


def post(path: bytes = b"/v1/chat/completions") -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"proxy.test"), (b":path", path),
            (b"content-type", b"application/json")]


def run_due(clock, limit: int = 10_000) -> int:
    """Run the calls due now one by one, at most `limit` (a send loop that polls never runs out); how many ran."""
    for ran in range(limit):
        due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
        if not due:
            return ran
        call = min(due, key=lambda c: c.getTime())
        func, args, kw = call.func, call.args, call.kw
        call.cancel()
        func(*args, **kw)
    return limit


class Client:
    """An h2 client on one in-memory connection to the proxy, negotiated as h2 the way TLS ALPN would."""

    def __init__(self, proxy: MemoryProxy, window: int | None = None):
        self.proxy = proxy
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        self.protocol = proxy.site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address, lenient=True)
        self.transport.negotiatedProtocol = b"h2"
        self.protocol.makeConnection(self.transport)
        # Sends any bytes it is told to, so the server's checks are what is tested.
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config)
        if window is not None:
            self.h2.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.h2.initiate_connection()
        self.events: list = []
        self.bodies: dict[int, bytes] = {}
        self.ack = True
        self.pump()

    @property
    def connection(self) -> http2.ForwardH2Connection:
        return self.protocol.channel

    def send_raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def pump(self, rounds: int = 30) -> None:
        """Move bytes between the client, the proxy and the fake upstream until all are quiet."""
        for _ in range(rounds):
            out = self.h2.data_to_send()
            if out and not self.transport.disconnecting:
                self.protocol.dataReceived(out)
            self.proxy.flush(2)
            assert run_due(self.proxy.clock) < 10_000, "the send loop polls"
            data = self.transport.value()
            self.transport.clear()
            if not data and not out:
                return
            if data:
                for event in self.h2.receive_data(data):
                    self.events.append(event)
                    if isinstance(event, h2.events.DataReceived):
                        self.bodies[event.stream_id] = self.bodies.get(event.stream_id, b"") + event.data
                        if self.ack:
                            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def request(self, headers, body: bytes | None = None, end: bool = True) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=end and body is None)
        if body is not None:
            self.h2.send_data(stream_id, body, end_stream=end)
        self.pump()
        return stream_id

    def status(self, stream_id: int) -> int | None:
        for event in self.events:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                return int(dict(event.headers)[b":status"])
        return None

    def reset(self, stream_id: int) -> bool:
        return any(isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id for e in self.events)

    def ended(self, stream_id: int) -> bool:
        return any(isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id for e in self.events)

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)


def advance(client: Client, seconds: float) -> None:
    client.proxy.clock.advance(seconds)
    client.pump()


# --- header blocks ----------------------------------------------------------------------------------------------


def flood_frames(size: int = 16384) -> tuple[bytes, bytes]:
    """A HEADERS frame opening a header block, and one CONTINUATION frame that never ends it."""
    opening = HeadersFrame(1, data=Encoder().encode(REQUEST)).serialize()
    return opening, ContinuationFrame(1, data=b"a" * size).serialize()


def test_a_continuation_flood_is_refused_within_one_frame_of_the_header_block_limit_with_a_goaway():
    client = Client(MemoryProxy(api_key="sk-a"))
    opening, frame = flood_frames()
    client.send_raw(opening)
    sent = 0
    while not client.transport.disconnecting:
        client.send_raw(frame)
        sent += len(frame)
        assert sent < 10 * http2.HEADER_BLOCK_LIMIT, "never refused"
    client.pump()
    assert sent <= http2.HEADER_BLOCK_LIMIT + len(frame)
    assert client.goaway().error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert client.transport.producerState == "paused", "nothing more is read from this client"
    assert client.transport.producer is None, "freed as producer, so a TLS transport really closes"
    client.proxy.clock.advance(http2.CLOSE_GRACE_SECONDS)
    assert client.transport.disconnected, "aborted once the grace is over"


def test_after_a_refusal_nothing_the_client_still_sends_is_kept_in_memory():
    client = Client(MemoryProxy(api_key="sk-a"))
    opening, frame = flood_frames()
    client.send_raw(opening)
    while not client.transport.disconnecting:
        client.send_raw(frame)
    batch = frame * 64  # 1 MiB a read
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(32):
            client.send_raw(batch)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024, f"{grown} bytes kept of 32 MiB"


def test_a_frame_announcing_more_than_the_max_frame_size_is_refused_before_its_payload_arrives():
    client = Client(MemoryProxy(api_key="sk-a"))
    client.send_raw(b"\x40\x00\x00" + b"\x00\x00" + b"\x00\x00\x00\x01")  # a DATA frame header announcing 4 MiB
    client.pump()
    assert client.goaway().error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR
    assert client.transport.disconnecting


def frames_strategy():
    kinds = st.sampled_from([0x0, 0x1, 0x5, 0x8, 0x9, 0x6])
    frame = st.tuples(kinds, st.integers(0, 3000), st.booleans())
    return st.lists(frame, max_size=40)


def wire(frames) -> bytes:
    out = bytearray(PREFACE)
    for kind, length, end_headers in frames:
        out += length.to_bytes(3, "big") + bytes([kind, 0x4 if end_headers else 0]) + b"\x00\x00\x00\x01"
        out += b"x" * length
    return bytes(out)


@settings(max_examples=200, deadline=None)
@given(frames_strategy(), st.lists(st.integers(1, 5000), max_size=30))
def test_property_a_header_block_is_measured_the_same_however_the_reads_cut_it(frames, cuts):
    data = wire(frames)
    whole = http2.InboundFrames(header_block_limit=8000, max_frame_size=2500)
    expected = whole.feed(data)
    pieces = http2.InboundFrames(header_block_limit=8000, max_frame_size=2500)
    position, found = 0, None
    for cut in [*cuts, len(data)]:
        found = pieces.feed(data[position : position + cut])
        position += cut
        if found is not None or position >= len(data):
            break
    assert found == expected
    if expected is None:
        assert pieces.header_block == whole.header_block


def test_a_header_block_that_never_ends_closes_the_connection_at_the_head_deadline_however_bytes_trickle():
    client = Client(MemoryProxy(api_key="sk-a"))
    opening, frame = flood_frames(size=10)
    client.send_raw(opening)
    for _ in range(int(http2.HEADER_TIMEOUT_SECONDS) - 1):
        client.proxy.clock.advance(1)
        client.send_raw(frame)
    assert not client.transport.disconnecting
    advance(client, 1)
    assert client.goaway().error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert client.transport.disconnecting


# --- streams and connections ------------------------------------------------------------------------------------


def test_the_proxy_advertises_its_bound_on_concurrent_streams_and_closes_a_client_that_ignores_it():
    client = Client(MemoryProxy(api_key="sk-a"))
    assert client.h2.remote_settings.max_concurrent_streams == http2.MAX_CONCURRENT_STREAMS
    client.h2.remote_settings.max_concurrent_streams = 10_000  # this client does not care
    client.h2.remote_settings.acknowledge()
    for _ in range(http2.MAX_CONCURRENT_STREAMS):
        client.request(post(), b"{", end=False)
    assert len(client.connection.streams) == http2.MAX_CONCURRENT_STREAMS
    client.request(post(), b"{", end=False)
    assert client.goaway() is not None and client.transport.disconnecting


def test_a_hundred_unfinished_request_bodies_cost_no_file_and_are_each_answered_408_and_reset_at_the_body_timeout():
    client = Client(MemoryProxy(api_key="sk-a"))
    fds = len(os.listdir("/proc/self/fd"))
    streams = [client.request(post(), b'{"model":', end=False) for _ in range(http2.MAX_CONCURRENT_STREAMS)]
    assert len(os.listdir("/proc/self/fd")) <= fds + 1, "an unfinished body costs no temporary file"
    advance(client, http2.BODY_TIMEOUT_SECONDS - 1)
    assert len(client.connection.streams) == len(streams), "not cut before the deadline"
    advance(client, 1)
    assert client.connection.streams == {}
    assert all(client.status(s) == 408 and client.reset(s) for s in streams)
    body = json.loads(client.bodies[streams[0]])
    assert body["error"]["code"] == "request_timeout"
    assert len(os.listdir("/proc/self/fd")) <= fds, "and every temp file is closed"
    assert client.proxy.upstream.received == []


def test_a_request_body_that_keeps_moving_is_never_cut_and_is_forwarded_whole():
    client = Client(MemoryProxy(api_key="sk-a"))
    payload = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "slow"}]}).encode()
    stream_id = client.request(post(), payload[:1], end=False)
    for byte in payload[1:]:
        advance(client, http2.BODY_TIMEOUT_SECONDS - 1)
        client.h2.send_data(stream_id, bytes([byte]))
        client.pump()
    client.h2.end_stream(stream_id)
    client.pump()
    assert client.status(stream_id) == 200
    assert client.proxy.upstream.received[-1].body == payload


def test_pings_do_not_keep_a_connection_without_streams_open_past_the_idle_timeout():
    client = Client(MemoryProxy(api_key="sk-a"))
    stream_id = client.request(REQUEST)
    assert client.status(stream_id) == 200 and client.ended(stream_id)
    for _ in range(int(IDLE) // 10):
        advance(client, 10)
        client.h2.ping(b"12345678")
        client.h2.increment_flow_control_window(1)
        client.pump()
    assert not client.transport.disconnecting
    advance(client, IDLE - (int(IDLE) // 10) * 10)
    assert client.goaway() is not None and client.transport.disconnecting
    assert client.transport.producer is None, "freed as producer, so a TLS transport really closes"


def test_a_running_stream_suspends_the_idle_timeout():
    client = Client(MemoryProxy(api_key="sk-a"))
    stream_id = client.request(REQUEST + [(b"x-fake-bytes", b"200000"), (b"x-fake-interval", b"40")])
    for _ in range(3):
        advance(client, 40)
    assert not client.transport.disconnecting
    assert client.status(stream_id) == 200 and client.ended(stream_id)


def test_a_response_whose_window_never_opens_waits_without_polling_and_is_reset_after_the_idle_timeout():
    proxy = MemoryProxy(api_key="sk-a")
    client = Client(proxy)
    client.ack = False
    # An upstream that writes 64 KiB a second; pump() fails if the send loop polls.
    stream_id = client.request(REQUEST + [(b"x-fake-bytes", b"300000"), (b"x-fake-interval", b"1")])
    advance(client, 5)
    assert len(client.bodies[stream_id]) == 65535, "the initial window, then nothing"
    assert run_due(proxy.clock) == 0, "nothing is scheduled to poll the shut window"
    assert proxy.gateway.in_flight == 1, "the upstream is paused, not drained into memory"
    advance(client, IDLE - 6)
    assert not client.reset(stream_id)
    advance(client, 1)
    assert client.reset(stream_id) and client.connection.streams == {}
    assert proxy.upstream.disconnects == 1, "the upstream request was dropped with the stream"


@pytest.mark.parametrize("shut", ["stream", "connection"])
def test_a_parked_stream_resumes_and_finishes_whole_when_its_window_opens(shut):
    proxy = MemoryProxy(api_key="sk-a")
    client = Client(proxy)
    client.ack = False
    size = 200_000
    stream_id = client.request(REQUEST + [(b"x-fake-bytes", b"%d" % size)])
    received = len(client.bodies[stream_id])
    advance(client, IDLE / 2)
    first, second = (None, stream_id) if shut == "stream" else (stream_id, None)
    client.h2.increment_flow_control_window(10**6, stream_id=first)
    client.pump()
    assert len(client.bodies[stream_id]) == received, f"the {shut} window still holds it"
    client.h2.increment_flow_control_window(10**6, stream_id=second)
    client.ack = True
    client.pump()
    assert client.ended(stream_id) and not client.reset(stream_id)
    assert client.bodies[stream_id] == (bytes(range(256)) * (size // 256 + 1))[:size]


def test_a_client_that_stops_reading_is_cut_after_the_idle_timeout():
    client = Client(MemoryProxy(api_key="sk-a"))
    client.request(REQUEST + [(b"x-fake-bytes", b"50000")])
    client.connection.pauseProducing()  # what the transport does when the client's socket buffer stays full
    advance(client, IDLE - 1)
    assert not client.transport.disconnected
    advance(client, 1)
    assert client.transport.disconnected


def test_a_client_goaway_closes_the_connection_and_frees_the_transport():
    client = Client(MemoryProxy(api_key="sk-a"))
    client.h2.close_connection()
    client.pump()
    assert client.transport.disconnecting and client.transport.producer is None
    assert client.transport.producerState != "paused", "a polite client is still read until it closes"


# --- malformed requests ------------------------------------------------------------------------------------------


MALFORMED = {
    "space in the target": [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/v1/mo dels")],
    "control character in a value": REQUEST + [(b"x-note", b"a\x01b")],
    "NUL in a value": REQUEST + [(b"x-note", b"a\x00b")],
    "CR LF in a value": REQUEST + [(b"x-note", b"a\r\nx-evil: 1")],
    "upper-case name": REQUEST + [(b"X-Note", b"1")],
    "space in a name": REQUEST + [(b"x note", b"1")],
    "surrounding whitespace": REQUEST + [(b"x-note", b" 1")],
    "connection header": REQUEST + [(b"connection", b"close")],
    "transfer-encoding": REQUEST + [(b"transfer-encoding", b"chunked")],
    "te other than trailers": REQUEST + [(b"te", b"gzip")],
    "no :path": [(b":method", b"GET"), (b":scheme", b"https")],
    "unknown pseudo-header": [(b":protocol", b"websocket"), *REQUEST],
    "pseudo-header after a header": [*REQUEST[:3], (b"x-a", b"1"), REQUEST[3]],
    "repeated :path": [*REQUEST, (b":path", b"/v1/models")],
    "CONNECT": [(b":method", b"CONNECT"), (b":authority", b"evil.test:443")],
    "absolute target": [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"http://169.254.169.254/")],
    "two content-lengths": post() + [(b"content-length", b"2"), (b"content-length", b"2")],
    "non-ASCII target": [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/v1/mod\xc3\xa9ls")],
}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
def test_a_malformed_request_gets_the_json_400_of_http11_on_its_stream_and_the_connection_serves_on(shape):
    client = Client(MemoryProxy(api_key="sk-a"))
    bad = client.request(MALFORMED[shape], b"{}" if MALFORMED[shape][0][1] == b"POST" else None)
    good = client.request(REQUEST)
    assert client.status(bad) == 400 and client.ended(bad)
    assert client.bodies[bad] == errors.bad_http_request().body(), "the same body as over HTTP/1.1"
    assert client.status(good) == 200 and client.goaway() is None
    assert [r.uri for r in client.proxy.upstream.received] == [b"/v1/models"]


def test_the_400_of_a_request_whose_body_is_still_coming_stops_that_body_and_nothing_else():
    client = Client(MemoryProxy(api_key="sk-a"))
    bad = client.request(post(b"/v1/chat completions"), b"{", end=False)
    assert client.status(bad) == 400 and client.reset(bad)
    client.send_raw(DataFrame(bad, data=b"late", flags=["END_STREAM"]).serialize())  # a client that sends anyway
    good = client.request(REQUEST)
    assert client.status(good) == 200 and client.goaway() is None


PLACES = {
    "method": lambda b: [(b":method", b"G" + b + b"ET"), *REQUEST[1:]],
    "target": lambda b: [*REQUEST[:3], (b":path", b"/v1/mo" + b + b"dels")],
    "query": lambda b: [*REQUEST[:3], (b":path", b"/v1/models?a=" + b)],
    "name": lambda b: [*REQUEST, (b"x-a" + b + b"b", b"1")],
    "value": lambda b: [*REQUEST, (b"x-ab", b"1" + b + b"2")],
}


@pytest.mark.parametrize("place", sorted(PLACES))
def test_every_byte_value_in_each_part_of_the_head_is_forwarded_or_gets_a_json_400_never_a_500(place):
    client = Client(MemoryProxy(api_key="sk-a"))
    outcomes = {}
    for value in range(256):
        stream_id = client.request(PLACES[place](bytes([value])))
        status = client.status(stream_id)
        assert status in (200, 400), (value, status)
        if status == 400:
            assert json.loads(client.bodies[stream_id])["error"]["code"] == "bad_http_request"
        outcomes[value] = status
        client.bodies.pop(stream_id, None)
    assert client.goaway() is None, "one connection served all 256"
    assert outcomes[ord("z")] == 200 and outcomes[0x00] == 400 and outcomes[0x7f] == 400


# --- over TLS, against the real daemon ---------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def tls(upstream, tmp_path_factory):
    key, cert = make_certificate(tmp_path_factory.mktemp("h2tls"))
    endpoint = f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    with DaemonProcess(["--port", endpoint], env={"OPENAI_BASE_URL": upstream.url}) as daemon:
        yield daemon


def h2_socket(port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1")
    assert sock.selected_alpn_protocol() == "h2"
    sock.sendall(PREFACE + SettingsFrame(0).serialize())
    return sock


def test_over_tls_a_50_mb_continuation_flood_is_cut_early_and_leaves_rss_flat(tls):
    pid = tls.process.pid
    before = rss_mb(pid)
    sock = h2_socket(tls.ports[0])
    opening, frame = flood_frames()
    batch = frame * 64
    sent, error, started = 0, None, time.monotonic()
    try:
        sock.sendall(opening)
        while sent < 50 * 1024 * 1024:
            sock.sendall(batch)
            sent += len(batch)
    except OSError as e:
        error = e
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    grown = rss_mb(pid) - before
    print(f"\nCONTINUATION flood: sent {sent / 2**20:.1f} MB before the daemon closed the connection "
          f"after {elapsed:.1f} s; RSS {before:.1f} MB -> +{grown:.1f} MB")
    assert error is not None and sent < 50 * 1024 * 1024, "the connection was closed early"
    assert grown < 20
    assert "header block larger than the limit" in tls.wait_for("header block larger")


def test_over_tls_a_client_that_never_opens_its_window_costs_no_cpu_while_the_stream_waits(tls):
    pid = tls.process.pid
    sock = h2_socket(tls.ports[0])
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.clear_outbound_data_buffer()  # the preface and SETTINGS went out already
    client.send_headers(1, [*REQUEST, (b"x-fake-bytes", b"4000000")], end_stream=True)
    sock.sendall(client.data_to_send())
    received, deadline = 0, time.monotonic() + 5
    sock.settimeout(0.2)
    while received < 65535 and time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        for event in client.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                received += len(event.data)
        sock.sendall(client.data_to_send())  # SETTINGS and PING acks only: never a WINDOW_UPDATE
    assert received == 65535
    used, started = cpu_seconds(pid), time.monotonic()
    time.sleep(2)
    share = (cpu_seconds(pid) - used) / (time.monotonic() - started)
    sock.close()
    print(f"\nshut window: the daemon used {share:.1%} of a core while the stream waited")
    assert share < 0.05

