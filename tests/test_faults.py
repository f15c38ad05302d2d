"""The fault and hostile-input suite (issue #7): the proxy attacked from both sides, and what users see.

In memory (MemoryProxy on a Clock) where time or exact state is the point: timeouts, slow clients, what an
abort leaves behind.  A real `twistd` and the fake upstream on loopback where sockets are the point: fds, RSS,
smuggling bytes, fuzzed garbage and the soak.  Every loop is bounded in count and time; the soak runs
FWD_SOAK_SECONDS (default 45).  Figures (fds, RSS, requests) are printed at the end of the module.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import http.client
import itertools
import json
import os
import random
import re
import select
import socket
import struct
import threading
import time
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from fwd import config as configuration
from fwd import settings as settings_module
from fwd.headers import CREDENTIALS, HOP_BY_HOP, request_headers, response_headers
from fwd.site import CONNECTION_IDLE_SECONDS, HEADER_TIMEOUT_SECONDS
from fwd.sse import SSEParser
from fwd.upstream import IDLE_CONNECTION_SECONDS
from tests.support.memory import MemoryProxy, split_response
from tests.support.processes import DaemonProcess, FakeUpstreamProcess

# Secrets the suite's daemon runs with; none may ever show up in what it writes or answers.
POOL_KEYS = ("sk-faults-pool-aaaa1111aaaa", "sk-faults-pool-bbbb2222bbbb")
FORWARD_KEY = "fk-faults-team-cccc3333cccc"
PROXY_KEY = "px-faults-gate-dddd4444dddd"
CLIENT_KEY = "sk-faults-own-eeee5555eeee"
SECRETS = (*POOL_KEYS, FORWARD_KEY, PROXY_KEY, CLIENT_KEY)
AUTH = f"Bearer {FORWARD_KEY}:{PROXY_KEY}"

PREFIX = "/openai"
CHAT = PREFIX + "/v1/chat/completions"
TIMEOUT = 2.0  # TIMEOUT and IDLE_TIMEOUT of the suite's daemon
IDLE = 2.0
MAX_BODY = 8 * 1024 * 1024
PROMPT = "alpha beta gamma delta epsilon zeta"
REPLY = "echo: " + PROMPT
SOAK_SECONDS = float(os.environ.get("FWD_SOAK_SECONDS", "45"))

# Everything the proxy answered in the real tests, checked for secrets at the end.
EVIDENCE: list[tuple[str, bytes]] = []
FIGURES: dict[str, object] = {}
_sent = itertools.count(1)  # real requests and connections the suite made
_ids = iter(range(1, 1 << 30))


def unique(kind: str) -> str:
    return f"{kind}-{next(_ids)}"


def chat_body(user: str, stream: bool = False, **extra) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}], "stream": stream, "user": user}
    body.update(extra)
    return json.dumps(body).encode()


def normalise(body: bytes) -> bytes:
    """A reply with the per-request ids and timestamps taken out, so two replies can be compared byte for byte."""
    return re.sub(rb'"(id|created)":("[^"]*"|\d+)', b"", body)


# ---------------------------------------------------------------------------------------------------------------
# real sockets: a tiny client, fd and RSS probes


class Reply:
    def __init__(self, status: int, headers: dict, body: bytes, error: BaseException | None, elapsed: float):
        self.status, self.headers, self.body, self.error, self.elapsed = status, headers, body, error, elapsed

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Reply {self.status} error={self.error!r} body={self.body[:200]!r}>"


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 15.0, auth: str | None = AUTH, keep: bool = True) -> Reply:
    """One request on a fresh connection; a broken body shows as `error`, never as a short clean body."""
    sent = {"Connection": "close"}
    if auth:
        sent["Authorization"] = auth
    if body is not None:
        sent["Content-Type"] = "application/json"
    sent.update(headers or {})
    next(_sent)
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=sent)
        try:
            response = connection.getresponse()
        except (ConnectionResetError, http.client.RemoteDisconnected) as e:
            return Reply(0, {}, b"", e, time.monotonic() - started)  # a broken connection, no status
        pieces, error = [], None
        try:
            while True:
                piece = response.read1(65536)
                if not piece:
                    break
                pieces.append(piece)
            if not response.chunked and response.length:
                error = http.client.IncompleteRead(b"".join(pieces), response.length)
        except (http.client.HTTPException, OSError) as e:
            error = e
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, b"".join(pieces), error,
                      time.monotonic() - started)
    finally:
        connection.close()
    if keep and (reply.status >= 400 or reply.error is not None):
        EVIDENCE.append((f"{method} {path} -> {reply.status}", reply.body))
    return reply


def raw_request(method: str, path: str, body: bytes = b"", headers: dict | None = None, auth: str | None = AUTH,
                length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if auth:
        lines.append(f"Authorization: {auth}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or length is not None or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body) if length is None else length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    next(_sent)
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def reset(sock: socket.socket) -> None:
    """Abort a connection the rude way: RST, not FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def read_all(sock: socket.socket, quiet: float = 5.0, limit: int = 1 << 22) -> tuple[bytes, bool]:
    """What the peer sends until it closes (True) or stays quiet for `quiet` seconds (False)."""
    data = b""
    sock.settimeout(quiet)
    try:
        while len(data) < limit:
            piece = sock.recv(65536)
            if not piece:
                return data, True
            data += piece
    except socket.timeout:
        return data, False
    except OSError:
        return data, True
    return data, False


def exchange_raw(port: int, data: bytes, quiet: float = 5.0) -> tuple[bytes, bool]:
    with connect(port) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        return read_all(sock, quiet)


def status_of(data: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    return int(match.group(1)) if match else None


def _tcp_table() -> dict[str, tuple[int, int, str]]:
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            table[parts[9]] = (int(parts[1].rsplit(":", 1)[1], 16), int(parts[2].rsplit(":", 1)[1], 16), parts[3])
    return table


def fd_census(pid: int, port: int, upstream_port: int) -> collections.Counter:
    """The daemon's open fds: client sockets, upstream sockets, listeners, and everything else."""
    table = _tcp_table()
    census = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        census["total"] += 1
        if target.startswith("socket:["):
            local, remote, state = table.get(target[8:-1], (None, None, None))
            if state == "0A":
                census["listening"] += 1
            elif local == port:
                census["client"] += 1
            elif remote == upstream_port:
                census["upstream"] += 1
            else:
                census["other"] += 1
        else:
            census["other"] += 1
    return census


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Daemon:
    """The suite's twistd, with its log drained in the background (a full stdout pipe would stall it)."""

    def __init__(self, process: DaemonProcess, home: Path, upstream: FakeUpstreamProcess):
        self.process = process
        self.home = home
        self.upstream = upstream
        self.port = process.ports[0]
        self.pid = process.process.pid
        self.chat_log = home / "Log" / "chat.jsonl"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drain = threading.Thread(target=self._drain_loop, daemon=True)
        self._drain.start()

    def _drain_loop(self):
        while not self._stop.wait(0.2):
            with self._lock:
                if self.process.process is None:
                    return
                self.process.output

    def log(self) -> str:
        with self._lock:
            return self.process.output if self.process.process is not None else self.process._output.decode(
                "utf-8", "replace")

    def census(self) -> collections.Counter:
        return fd_census(self.pid, self.port, self.upstream.port)

    def health(self) -> dict:
        return call(self.port, "GET", "/healthz", auth=None, timeout=5).json()

    def quiet(self, timeout: float = 10.0) -> collections.Counter:
        """Wait until no request runs and no client socket is left; return the fd census then."""
        def settled():
            if self.health()["in_flight"]:
                return None
            census = self.census()
            return census if census["client"] == 0 else None

        census = wait_until(settled, timeout, 0.1)
        assert census, f"the daemon did not settle: {self.health()} {self.census()}"
        return census

    def transcripts(self) -> list[dict]:
        if not self.chat_log.exists():
            return []
        text = self.chat_log.read_text(encoding="utf-8")  # whole lines only: one may be half-written
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]

    def transcript(self, user: str, timeout: float = 5.0) -> dict:
        def find():
            found = [r for r in self.transcripts() if isinstance(r.get("request"), dict) and r["request"].get("user") == user]
            return found or None

        found = wait_until(find, timeout)
        assert found, f"no transcript for {user}"
        assert len(found) == 1, f"{len(found)} transcripts for one exchange {user}"
        return found[0]

    def stop(self):
        self._stop.set()
        self._drain.join(5)
        with self._lock:
            self.process.stop()


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory, request):
    home = tmp_path_factory.mktemp("faults")
    env = {
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_API_KEY": " ".join(POOL_KEYS),
        "FORWARD_KEY": FORWARD_KEY,
        "PROXY_KEY": PROXY_KEY,
        "ROUTE_PREFIX": PREFIX,
        "LOG_CHAT": "true",
        "LOG_DIR": str(home / "Log"),
        "TIMEOUT": f"{TIMEOUT:g}",
        "IDLE_TIMEOUT": f"{IDLE:g}",
        "MAX_BODY_SIZE": str(MAX_BODY),
        "CHECK_KEYS": "false",  # its GET /v1/models at startup would be taken for a request of the first test
    }
    process = DaemonProcess(env=env, cwd=str(home))
    process.start()
    daemon = Daemon(process, home, upstream)
    yield daemon
    daemon.stop()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and FIGURES:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(f"fault suite figures: requests run {next(_sent) - 1}; " + "; ".join(
                f"{k} {v}" for k, v in FIGURES.items()))


# ---------------------------------------------------------------------------------------------------------------
# 1. upstream faults: silent before headers, silent mid-stream, reset mid-stream


def test_an_upstream_silent_before_headers_is_a_504_json_near_timeout(proxy, upstream):
    before = upstream.disconnects()
    user = unique("silent-head")
    reply = call(proxy.port, "POST", CHAT, chat_body(user), {"x-fake-fail": "hang-before-headers"})
    assert reply.status == 504, reply
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == "upstream_timeout" and "TIMEOUT" in error["message"]
    assert TIMEOUT - 0.1 <= reply.elapsed < TIMEOUT + 1.5
    assert wait_until(lambda: upstream.disconnects() > before, 3), "the upstream request was left hanging"
    record = proxy.transcript(user)
    assert record["status"] == 504 and record["error"]


def stream_until_broken(port: int, user: str, fail: str) -> tuple[int, bytes, BaseException | None, float]:
    """Read a streamed reply; returns status, the bytes seen, how it broke, and seconds from first byte to break."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    next(_sent)
    try:
        connection.request("POST", CHAT, body=chat_body(user, stream=True),
                           headers={"Authorization": AUTH, "Content-Type": "application/json", "x-fake-fail": fail})
        response = connection.getresponse()
        seen = response.read1(65536)
        first = time.monotonic()
        error = None
        try:
            while True:
                piece = response.read1(65536)
                if not piece:
                    break
                seen += piece
        except (http.client.HTTPException, OSError) as e:
            error = e
        return response.status, seen, error, time.monotonic() - first
    finally:
        connection.close()


def test_an_upstream_silent_mid_stream_aborts_the_client_after_idle_timeout_with_a_partial_transcript(proxy):
    user = unique("silent-body")
    status, seen, error, waited = stream_until_broken(proxy.port, user, "hang-mid-stream")
    assert status == 200
    assert b"data: " in seen, "the first chunk arrived before the upstream went silent"
    assert error is not None, "the client must see a broken stream"
    assert b"[DONE]" not in seen
    assert IDLE - 0.3 <= waited < IDLE + 2.0
    record = proxy.transcript(user)
    assert record["partial"] is True and "silent" in record["error"]
    content = record["response"]["content"]
    assert content and REPLY.startswith(content) and content != REPLY


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_an_upstream_reset_mid_body_is_a_broken_body_never_a_clean_end(proxy, stream):
    user = unique("reset")
    reply = call(proxy.port, "POST", CHAT, chat_body(user, stream=stream),
                 {"x-fake-fail": "reset-mid-stream", "x-fake-interval": "0.3"})
    assert reply.status == 200
    assert reply.body, "the bytes sent before the reset were relayed as they came"
    assert reply.error is not None, f"a truncated body ended cleanly: {reply.body[-80:]!r}"
    assert b"[DONE]" not in reply.body
    record = proxy.transcript(user)
    assert record["partial"] is True and record["error"] == "upstream connection lost"


def test_every_byte_relayed_before_an_upstream_reset_reaches_the_client_before_the_break(proxy):
    outcomes = collections.Counter()
    for _ in range(60):
        reply = call(proxy.port, "POST", CHAT, chat_body(unique("fast-reset"), stream=True),
                     {"x-fake-fail": "reset-mid-stream"})
        assert reply.error is not None and b"[DONE]" not in reply.body
        outcomes[(reply.status, reply.body.count(b"data: "))] += 1
    # The fake upstream sends the head and two writes (three events), then resets: all of it was relayed.
    assert outcomes == {(200, 3): 60}, outcomes


# ---------------------------------------------------------------------------------------------------------------
# 2. client aborts: the upstream request is cancelled at once, nothing is left behind


def memory_connection(proxy: MemoryProxy):
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = proxy.site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def memory_chat(stream: bool, extra: bytes = b"") -> bytes:
    body = chat_body("memory", stream=stream)
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def test_in_memory_a_spooled_body_stays_open_until_its_stream_ends_a_small_one_is_let_go_at_once():
    # An upstream may answer before it has read all of a big body while the body's producer still sends from
    # its file: closing that file when the answer starts broke the send (an error logged each time).  A body
    # in memory is sent in one write, so it is let go as soon as the answer starts.
    from fwd.body import SPOOL_AT

    proxy = MemoryProxy()
    for size, spooled in ((SPOOL_AT + 1, True), (1000, False)):
        protocol, transport = memory_connection(proxy)
        body = chat_body("x" * size, stream=True)
        protocol.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
                              b"x-fake-chunks: 4\r\nx-fake-interval: 1\r\nContent-Length: %d\r\n\r\n" % len(body))
        for start in range(0, len(body), 65536):
            protocol.dataReceived(body[start:start + 65536])
        for _ in range(40):  # a spooled body goes upstream a piece per slice of the cooperator
            proxy.advance(0.01)
        request = protocol.channel.requests[0]
        assert b"data: " in transport.value()
        if spooled:
            assert request.content is not None and request.content.spooled and not request.content.closed
        else:
            assert request.content is None
        for _ in range(6):
            proxy.advance(1)
        assert transport.value().endswith(b"0\r\n\r\n")
        assert request.content is None or request.content.closed
        assert proxy.upstream.received[-1].body == body


ABORTS = {
    "before-headers": memory_chat(False, b"x-fake-fail: hang-before-headers\r\n"),
    "mid-stream": memory_chat(True, b"x-fake-chunks: 50\r\nx-fake-interval: 1\r\n"),
    "mid-upload": b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 500000\r\n\r\n" + b"{" * 1000,
}


@pytest.mark.parametrize("moment", list(ABORTS))
def test_in_memory_a_client_abort_cancels_the_upstream_at_once_and_leaves_nothing_pending(moment):
    proxy = MemoryProxy(log_chat="true")
    for round_ in range(1, 51):
        protocol, transport = memory_connection(proxy)
        protocol.dataReceived(ABORTS[moment])
        proxy.flush()
        request = protocol.channel.requests[0]
        if moment == "mid-stream":
            assert b"data: " in transport.value()
            assert request.content is None, "a stream under way still holds its request body"
        protocol.connectionLost(Failure(ConnectionLost("client went away")))
        proxy.flush()  # no clock advance: "at once"
        reached = 0 if moment == "mid-upload" else round_
        assert len(proxy.upstream.received) == reached
        assert proxy.upstream.disconnects == reached, "the upstream request was not cancelled"
        if request.content is not None:
            assert request.content.closed, "the buffered body (a temp file for big ones) was not closed"
    # Every exchange ended (each ends once, when it leaves the count); its upstream request was cancelled above.
    assert (proxy.gateway.in_flight, proxy.gateway.streams) == (0, 0)
    # No upstream timeout, idle timer, fake-stream timer or connection timeout is left on the clock.
    assert proxy.clock.getDelayedCalls() == []


def test_300_client_aborts_leak_no_fd_no_connection_and_cancel_every_upstream_request(proxy, upstream):
    for _ in range(8):  # warm the upstream connection pool
        call(proxy.port, "POST", CHAT, chat_body(unique("warm")))
    before = proxy.quiet()
    transcripts_before = len(proxy.transcripts())
    upstream.reset()
    rng = random.Random(300)
    moments = ["before-headers", "mid-stream", "mid-upload"] * 100
    rng.shuffle(moments)
    marks = collections.Counter()

    def abort(moment: str):
        user = unique("abort-" + moment)
        with connect(proxy.port) as sock:
            if moment == "before-headers":
                sock.sendall(raw_request("POST", CHAT, chat_body(user), {"x-fake-fail": "hang-before-headers"}))
                time.sleep(0.3)
            elif moment == "mid-stream":
                sock.sendall(raw_request("POST", CHAT, chat_body(user, stream=True),
                                         {"x-fake-chunks": "40", "x-fake-interval": "0.1"}))
                data = b""
                while b"data: " not in data:
                    piece = sock.recv(65536)
                    assert piece, "the stream ended before its first event"
                    data += piece
            else:
                sock.sendall(raw_request("POST", CHAT, b"{" * 2000, length=200_000))
            marks[moment] += 1
            if rng.random() < 0.5:
                reset(sock)

    threads = []
    pending = list(moments)
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                moment = pending.pop()
            abort(moment)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(marks.values()) == 300, marks
    reached = lambda: [r for r in upstream.received() if r["uri"] == "/v1/chat/completions"]
    # Every abort the upstream saw is a disconnect it saw, within a second or two of the last one.
    assert wait_until(lambda: upstream.disconnects() >= len(reached()), 3)
    got = reached()
    assert upstream.disconnects() == len(got)
    assert len(got) >= 190, f"only {len(got)} of 200 aborted exchanges reached the upstream"
    bodies = [json.loads(base64.b64decode(r["body_base64"])) for r in got]
    assert not [b for b in bodies if str(b.get("user", "")).startswith("abort-mid-upload")]
    after = proxy.quiet()
    FIGURES["fds before/after 300 aborts"] = f"{before['total']}/{after['total']}"
    assert after["client"] == 0
    assert after["other"] == before["other"], (before, after)
    assert after["total"] <= before["total"] + 2, (before, after)
    # Each exchange that reached the upstream left exactly one (partial) transcript.
    assert wait_until(lambda: len(proxy.transcripts()) - transcripts_before >= len(got), 3)
    new = proxy.transcripts()[transcripts_before:]
    assert len(new) >= len(got)
    assert all(r["partial"] and r["error"] == "client disconnected" for r in new)
    FIGURES["300 aborts took"] = f"{time.monotonic() - started:.1f} s"


# ---------------------------------------------------------------------------------------------------------------
# 3. body limits and slow clients


def test_a_body_declared_over_max_body_size_is_refused_413_json_before_any_byte_of_it(proxy, upstream):
    upstream.reset()
    started = time.monotonic()
    data, closed = exchange_raw(proxy.port, raw_request("POST", CHAT, length=50 * 1024**3))
    assert status_of(data) == 413 and closed
    assert time.monotonic() - started < 2, "the 413 did not wait for the body"
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "body_too_large"
    EVIDENCE.append(("413", data))
    assert upstream.received() == []


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_oversized_upload_is_a_413_and_never_buffered_in_memory(proxy, upstream, framing):
    upstream.reset()
    rss = rss_mb(proxy.pid)
    total = 6 * MAX_BODY
    piece = b"x" * 65536
    with connect(proxy.port) as sock:
        if framing == "chunked":
            sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
            piece = b"10000\r\n" + piece + b"\r\n"
        else:
            sock.sendall(raw_request("POST", CHAT, length=total))
        sent = 0
        try:
            while sent < total:
                sock.sendall(piece)
                sent += 65536
        except OSError:
            pass
        data, _ = read_all(sock, 5)
    assert sent < total, "the proxy kept reading a body it had refused"
    if data:  # after a reset the client may not get to read it; when it does, it is the 413
        assert status_of(data) == 413, data[:200]
    assert rss_mb(proxy.pid) - rss < 8, "the refused body was buffered"
    assert upstream.received() == []


def slow_memory_proxy(**settings) -> MemoryProxy:
    return MemoryProxy(**settings)


def test_in_memory_a_trickled_request_head_gets_408_at_the_header_deadline_though_bytes_keep_coming():
    proxy = slow_memory_proxy()
    protocol, transport = memory_connection(proxy)
    head = b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Slow: " + b"a" * 100
    elapsed = 0
    for byte in head:
        protocol.dataReceived(bytes([byte]))
        proxy.clock.advance(1)
        elapsed += 1
        if transport.disconnecting:
            break
    assert transport.disconnecting, "a slow-loris head kept the connection open"
    assert elapsed == HEADER_TIMEOUT_SECONDS
    status, _, body = split_response(transport.value())
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert proxy.upstream.received == []
    protocol.connectionLost(Failure(ConnectionLost()))
    assert proxy.clock.getDelayedCalls() == []


def seconds_until_closed(proxy, protocol, transport, piece, limit: int = 100) -> int:
    """Send the bytes `piece(n)` gives in second n, once a second, until the proxy closes the connection; return
    the seconds it took (`limit` if it never did)."""
    for n in range(1, limit):
        proxy.clock.advance(1)
        if transport.disconnecting:
            return n
        protocol.dataReceived(piece(n))
    return limit


def test_in_memory_a_head_sent_a_whole_line_at_a_time_gets_the_header_deadline_too():
    # Every read ends at a line end, so no read leaves a partial line behind: the head is still not complete.
    proxy = slow_memory_proxy()
    protocol, transport = memory_connection(proxy)
    protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
    seconds = seconds_until_closed(proxy, protocol, transport, lambda n: b"X-Line-%d: 1\r\n" % n)
    assert seconds == HEADER_TIMEOUT_SECONDS
    assert transport.disconnecting and b"HTTP/1.1 408 " in transport.value()


def test_in_memory_a_head_whose_lines_never_end_gets_the_header_deadline_too():
    # Reads that each end in a bare LF: twisted.web's lines end in CRLF, so not one line of this head is ever
    # complete; a byte every 74 s would otherwise hold the connection open until the line limit, for days.
    proxy = slow_memory_proxy()
    protocol, transport = memory_connection(proxy)
    protocol.dataReceived(b"GET /v1/models HTTP/1.1\n")
    assert seconds_until_closed(proxy, protocol, transport, lambda n: b"\n") == HEADER_TIMEOUT_SECONDS
    assert b"HTTP/1.1 408 " in transport.value()


def test_in_memory_a_head_trickled_behind_a_request_answered_at_once_gets_the_header_deadline_too():
    proxy = slow_memory_proxy()
    protocol, transport = memory_connection(proxy)
    protocol.dataReceived(b"POST /healthz HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\n")
    proxy.flush()
    assert transport.value().count(b"HTTP/1.1 200 ") == 1
    assert seconds_until_closed(proxy, protocol, transport, lambda n: b"\n") == HEADER_TIMEOUT_SECONDS
    assert b"HTTP/1.1 408 " in transport.value()


def test_in_memory_a_keep_alive_connection_idle_after_a_request_with_a_body_is_not_answered_408():
    # The request's last byte is its body's, not a line end: nothing of a next head has arrived.
    proxy = slow_memory_proxy()
    protocol, transport = memory_connection(proxy)
    protocol.dataReceived(b"POST /healthz HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\n{}")
    proxy.flush()
    assert split_response(transport.value())[0] == 200
    proxy.clock.advance(HEADER_TIMEOUT_SECONDS + 1)
    assert not transport.disconnecting and b" 408 " not in transport.value()
    proxy.clock.advance(CONNECTION_IDLE_SECONDS)
    assert transport.disconnecting and b" 408 " not in transport.value()


def test_in_memory_a_pipelined_partial_head_behind_a_request_gets_the_header_deadline_too():
    proxy = slow_memory_proxy()
    protocol, transport = memory_connection(proxy)
    protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: p\r\nX-Sl")
    proxy.flush()
    assert transport.value().count(b"HTTP/1.1 200 ") == 1
    proxy.clock.advance(HEADER_TIMEOUT_SECONDS - 1)
    assert not transport.disconnecting
    proxy.clock.advance(2)
    assert transport.disconnecting and b"HTTP/1.1 408 " in transport.value()


def test_in_memory_an_idle_connection_closes_after_the_idle_timeout_not_twelve_hours():
    proxy = slow_memory_proxy()
    protocol, transport = memory_connection(proxy)
    protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n")
    proxy.flush()
    assert split_response(transport.value())[0] == 200
    proxy.clock.advance(CONNECTION_IDLE_SECONDS - 1)
    assert not transport.disconnecting
    proxy.clock.advance(2)
    assert transport.disconnecting, "an idle keep-alive connection was kept"


def test_in_memory_a_stream_longer_than_every_client_timeout_is_never_cut():
    proxy = slow_memory_proxy(idle_timeout="30")
    protocol, transport = memory_connection(proxy)
    protocol.dataReceived(memory_chat(True, b"x-fake-chunks: 40\r\nx-fake-interval: 5\r\n"))
    proxy.flush()
    for _ in range(45):  # 225 s: far past the header deadline and the idle timeout, no client byte at all
        proxy.advance(5)
        assert not transport.disconnecting, "a running stream was cut by a client-side timeout"
    value = transport.value()
    assert value.endswith(b"0\r\n\r\n") and b"data: [DONE]" in value
    proxy.clock.advance(CONNECTION_IDLE_SECONDS + 1)
    assert transport.disconnecting, "after the stream, the idle timeout applies again"


def test_in_memory_a_slow_body_upload_is_not_cut_by_the_header_deadline():
    proxy = slow_memory_proxy()
    protocol, transport = memory_connection(proxy)
    body = chat_body("slow-upload")
    protocol.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body))
    for start in range(0, len(body), 10):
        protocol.dataReceived(body[start:start + 10])
        proxy.advance(5)
        assert not transport.disconnecting
    proxy.flush()
    assert split_response(transport.value())[0] == 200
    assert proxy.upstream.received[-1].body == body


# ---------------------------------------------------------------------------------------------------------------
# 4. smuggling shapes, absolute-form targets, odd paths

SMUGGLE = "GET /openai/v1/models?smuggled=1 HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLING = {
    "content-length-and-chunked": f"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLE}",
    "chunked-and-content-length": f"Transfer-Encoding: chunked\r\nContent-Length: {5 + len(SMUGGLE)}\r\n\r\n0\r\n\r\n{SMUGGLE}",
    "duplicate-content-length": f"Content-Length: 0\r\nContent-Length: {len(SMUGGLE)}\r\n\r\n{SMUGGLE}",
    "same-content-length-twice": "Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "content-length-list": "Content-Length: 2, 2\r\n\r\n{}",
    "signed-content-length": "Content-Length: +2\r\n\r\n{}",
    "space-before-colon": f"Transfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{SMUGGLE}",
    "obs-fold": "X-Note: a\r\n b\r\nContent-Length: 2\r\n\r\n{}",
    "obs-fold-transfer-encoding": f"Transfer-Encoding:\r\n chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{SMUGGLE}",
    "identity-transfer-encoding": f"Transfer-Encoding: identity\r\n\r\n{SMUGGLE}",
    "chunked-not-last": f"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLE}",
    "bad-chunk-size": f"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n{SMUGGLE}",
    "control-character": f"X-Note: a\x0bb\r\nContent-Length: 0\r\n\r\n{SMUGGLE}",
    "bare-cr": f"X-Note: a\rContent-Length: 0\r\nContent-Length: 0\r\n\r\n{SMUGGLE}",
}


@pytest.mark.parametrize("shape", list(SMUGGLING))
def test_request_smuggling_shapes_are_a_400_that_reaches_nothing(proxy, upstream, shape):
    upstream.reset()
    head = f"POST {PREFIX}/v1/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH}\r\n"
    data, closed = exchange_raw(proxy.port, (head + SMUGGLING[shape]).encode())
    EVIDENCE.append((shape, data))
    assert status_of(data) == 400, data[:200]
    assert data.count(b"HTTP/1.1 ") == 1, "a smuggled second request was answered"
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "bad_http_request"
    assert closed
    assert upstream.received() == []


def test_obs_text_in_header_values_is_not_refused_and_passes_untouched():
    proxy = MemoryProxy()
    transport = proxy.raw(b"GET /v1/echo HTTP/1.1\r\nHost: p\r\nX-Name: Ren\xe9e\t\xff\r\n\r\n")
    assert split_response(transport.value())[0] == 200
    assert proxy.upstream.received[-1].header(b"x-name") == b"Ren\xe9e\t\xff"


def test_a_transfer_encoding_on_http_1_0_is_a_400():
    proxy = MemoryProxy()
    transport = proxy.raw(b"POST /v1/echo HTTP/1.0\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert split_response(transport.value())[0] == 400
    assert proxy.upstream.received == []


class Sentinel:
    """A listener that must never be connected to: where an absolute-form target would lead."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_absolute_form_and_authority_targets_never_reach_anything_but_the_configured_upstream(proxy, upstream):
    sentinel = Sentinel()
    elsewhere = f"127.0.0.1:{sentinel.port}"
    try:
        upstream.reset()
        for target in (f"http://{elsewhere}{CHAT}", f"http://{elsewhere}/", "http://169.254.169.254/latest/meta-data/",
                       f"https://{elsewhere}/", elsewhere, "*", f"CONNECT {elsewhere}"):
            method, _, target = target.rpartition(" ")
            data, _ = exchange_raw(proxy.port, f"{method or 'GET'} {target} HTTP/1.1\r\nHost: {elsewhere}\r\n"
                                               f"Authorization: {AUTH}\r\nConnection: close\r\n\r\n".encode())
            EVIDENCE.append((target, data))
            assert status_of(data) in (400, 404), (target, data[:200])
        assert upstream.received() == []
        # Paths that only look like another host stay paths on the configured upstream.
        for path in (f"{PREFIX}//{elsewhere}/x", f"{PREFIX}/@{elsewhere}/x", f"{PREFIX}/\\\\{elsewhere}/x"):
            data, _ = exchange_raw(proxy.port, f"GET {path} HTTP/1.1\r\nHost: {elsewhere}\r\nAuthorization: {AUTH}\r\n"
                                               "Connection: close\r\n\r\n".encode())
            assert status_of(data) == 200, data[:200]
            received = upstream.received()[-1]
            assert received["uri"] == path[len(PREFIX):]
            assert dict((n.lower(), v) for n, v in received["headers"])["host"] == upstream.url.removeprefix("http://")
        assert sentinel.accepted == 0, "the proxy connected somewhere else"
    finally:
        sentinel.close()


ODD_PATHS = [
    "/openai/../v1/models", "/openai/%2e%2e/v1/models", "/openai/%2E%2e%2Fadmin", "/openai/v1/..%2f..%2fadmin",
    "/openai/.%2e/admin", "/openai%2f..%2fadmin", "/openai/v1/%2e/models", "/openai/..\\admin",
    "/openai/v1/%5c..%5cadmin", "/openaiX/v1/models", "/OPENAI/v1/models", "//openai/v1/models",
    "/openai/v1/models/%C3%A9", "/openai/v1/%00", "/openai/v1/%252e%252e/admin", "/openai/v1/models?x=/../..",
    "/openai/openai/;", "/openai/v1/models;?a=b",
]


@pytest.mark.parametrize("path", ODD_PATHS)
def test_odd_paths_on_a_real_socket_never_escape_the_route_prefix(proxy, upstream, path):
    upstream.reset()
    data, _ = exchange_raw(proxy.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
                                       "Connection: close\r\n\r\n".encode())
    status = status_of(data)
    received = upstream.received()
    if received:
        check_stays_under_prefix(path.encode(), received[-1]["uri"].encode())
    else:
        assert status in (400, 404), data[:200]
        EVIDENCE.append((path, data))


def test_raw_non_ascii_bytes_in_the_target_are_a_400(proxy, upstream):
    upstream.reset()
    data, _ = exchange_raw(proxy.port, b"GET /openai/v1/mod\xc3\xa9ls HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(data) == 400
    assert upstream.received() == []


def check_stays_under_prefix(path: bytes, uri: bytes) -> None:
    """What reached the upstream is the request's target minus the prefix, and climbs nowhere when decoded."""
    target, _, query = path.partition(b"?")
    assert target == PREFIX.encode() or target.startswith(PREFIX.encode() + b"/"), (path, uri)
    assert uri == path[len(PREFIX):] or (target == PREFIX.encode() and uri in (b"/", b"/?" + query)), (path, uri)
    decoded = unquote_to_bytes(uri.partition(b"?")[0]).replace(b"\\", b"/")
    assert not any(segment in (b".", b"..") for segment in decoded.split(b"/")), (path, uri)


PIECES = ["openai", "OPENAI", "openai%2f", "v1", "models", "..", ".", "%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c",
          "\\", "%00", "%C3%A9", "@", ";", "", "%25", "%252e%252e", "x?y=../..", "chat"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=7), st.lists(st.sampled_from(["/", ""]), min_size=7,
                                                                          max_size=7))
def test_property_no_generated_path_escapes_the_route_prefix(pieces, joins):
    path = "/" + "".join(p + j for p, j in zip(pieces, joins))
    # The in-memory upstream (treq.testing) parses the URL it is given and drops an empty `;` parameter of the
    # last segment; the daemon sends it as it came, which ODD_PATHS checks on real sockets.
    assume(re.search(r";(\?|$)", path.partition("?")[0] + "?") is None)
    proxy = MemoryProxy(route_prefix=PREFIX)
    transport = proxy.raw(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: p\r\n\r\n")
    status = split_response(transport.value())[0]
    if proxy.upstream.received:
        check_stays_under_prefix(path.encode(), proxy.upstream.received[-1].uri)
    else:
        assert status in (400, 404), (path, transport.value()[:200])


# ---------------------------------------------------------------------------------------------------------------
# 5. hostile bodies with LOG_CHAT on


def hostile_bodies() -> dict[str, bytes]:
    rng = random.Random(5)
    huge = json.dumps({"model": "gpt-4o-mini", "user": "huge",
                       "messages": [{"role": "user", "content": "word " * 1_200_000}]}).encode()
    return {
        "truncated-json": b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi',
        "binary": bytes(rng.getrandbits(8) for _ in range(65536)),
        "huge-json": huge,
        "deeply-nested": b'{"model": "m", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        "invalid-utf8": b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}',
        "not-an-object": b'[1, 2, {"model": "m"}]',
        "nan-and-huge-numbers": b'{"model": "m", "temperature": NaN, "n": 1e999999, "messages": []}',
        "empty": b"",
    }


def test_hostile_bodies_are_forwarded_untouched_logged_as_unparsed_and_the_daemon_keeps_serving(proxy, upstream):
    upstream.reset()
    before = len(proxy.transcripts())
    bodies = hostile_bodies()
    assert len(bodies["huge-json"]) > 5_000_000
    for name, body in bodies.items():
        reply = call(proxy.port, "POST", CHAT, body, timeout=30)
        assert reply.error is None and reply.status in (200, 400, 500), (name, reply)
        for own in (b"The proxy failed", b"Could not reach", b"bad_http_request"):
            assert own not in reply.body, (name, reply)  # any error is the upstream's own, passed through
        received = upstream.received()[-1]
        assert received["body_length"] == len(body), name
        assert received["body_sha256"] == hashlib.sha256(body).hexdigest(), f"{name} was altered"
    assert wait_until(lambda: len(proxy.transcripts()) - before >= len(bodies), 5)
    records = proxy.transcripts()[before:]
    assert len(records) == len(bodies)
    unparsable = [r for r in records if r["request"] is None]
    assert len(unparsable) >= 5  # truncated, binary, nested, invalid UTF-8, empty
    assert all("request body is not JSON" in r["parse_error"] for r in unparsable)
    huge = next(r for r in records if isinstance(r["request"], dict) and r["request"].get("user") == "huge")
    assert huge["truncated"] is True
    assert proxy.health()["status"] == "ok"
    assert call(proxy.port, "POST", CHAT, chat_body(unique("after-hostile"))).status == 200
    assert "Traceback" not in proxy.log()


# ---------------------------------------------------------------------------------------------------------------
# 6. fuzzed garbage on the socket; properties of the pure parsers


def fuzz_cases(count: int, seed: int = 6) -> list[bytes]:
    rng = random.Random(seed)
    body = chat_body("fuzz")
    template = raw_request("POST", CHAT, body)
    methods = [b"GET", b"POST", b"PRI", b"CONNECT", b"G\x00T", b"", b"TRACE", b"P OST", b"\xff\xfe", b"DELETE"]
    versions = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.10", b"", b"http/1.1", b"HTTP/1.1x"]

    def mutate(data: bytes) -> bytes:
        data = bytearray(data)
        kind = rng.randrange(12)
        if kind == 0:
            for _ in range(rng.randint(1, 10)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
        elif kind == 1:
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        elif kind == 2:
            at = rng.randrange(len(data))
            del data[at:at + rng.randint(1, 64)]
        elif kind == 3:
            del data[rng.randrange(len(data)):]
        elif kind == 4:
            lines = bytes(data).split(b"\r\n")
            lines.insert(rng.randrange(1, len(lines)), rng.choice(lines))
            data = bytearray(b"\r\n".join(lines))
        elif kind == 5:
            data = bytearray(bytes(data).replace(b"\r\n", rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"]),
                                                 rng.randint(1, 6)))
        elif kind == 6:
            line = bytes(data).split(b"\r\n", 1)
            parts = line[0].split(b" ")
            parts[0] = rng.choice(methods)
            parts[-1] = rng.choice(versions)
            data = bytearray(b" ".join(parts) + b"\r\n" + (line[1] if len(line) > 1 else b""))
        elif kind in (7, 8):
            at = data.find(b"\r\n") + 2 if b"\r\n" in data else 0
            if kind == 7:
                data[at:at] = b"X-Long: " + b"a" * rng.randint(8000, 70000) + b"\r\n"
            else:
                data[at:at] = b"".join(b"X-H%d: v\r\n" % i for i in range(rng.randint(100, 700)))
        elif kind == 9:
            chunks = b"".join(rng.choice([b"%x\r\n%s\r\n" % (n, b"z" * n) for n in (0, 1, 5, 17)] +
                                         [b"zz\r\n", b"-1\r\n", b"ffffffffffffffffff\r\n", b"5\r\nab\r\n", b"\r\n"])
                              for _ in range(rng.randint(1, 6)))
            data = bytearray(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
                             "Transfer-Encoding: chunked\r\n\r\n".encode() + chunks)
        elif kind == 10:
            data = bytearray(rng.choice([b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                                         b"Expect: 100-continue\r\n", b"\r\n\r\n\r\n"]) +
                             bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 512))))
        else:
            data = bytearray(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096))))
        return bytes(data)

    cases = []
    for _ in range(count):
        data = template
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            data = mutate(data) or b"\r\n"
        cases.append(data)
    return cases


def test_a_few_hundred_seeded_fuzzed_requests_never_crash_or_hang_the_daemon(proxy, upstream):
    before = proxy.quiet()
    log_start = len(proxy.log())
    cases = fuzz_cases(320)
    outcomes = collections.Counter()
    statuses = collections.Counter()
    bad = []
    lock = threading.Lock()
    pending = list(enumerate(cases))
    health_latency = []

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                number, data = pending.pop()
            data_back, closed = exchange_raw(proxy.port, data, quiet=0.8)
            status = status_of(data_back)
            with lock:
                outcomes["answered" if data_back else "closed" if closed else "waiting for more"] += 1
                statuses[status] += 1
                if data_back and (status is None or status >= 500 or b"The proxy failed" in data_back):
                    bad.append((number, data[:120], data_back[:200]))
                if data_back and (status or 0) >= 400:  # the proxy's own answers, not the fake's echoes
                    EVIDENCE.append((f"fuzz {number}", data_back))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        started = time.monotonic()
        assert proxy.health()["status"] == "ok"
        health_latency.append(time.monotonic() - started)
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert sum(outcomes.values()) == len(cases)
    assert not bad, f"answers no client should get: {bad[:5]}"
    assert outcomes["answered"] > len(cases) // 3, outcomes
    assert max(health_latency) < 2.0, "the daemon stalled while fuzzed"
    log = proxy.log()[log_start:]
    for sign in ("Traceback", "Unhandled", "request handling failed", "forwarding failed", "could not be built"):
        assert sign not in log, sign
    after = proxy.quiet()
    assert after["other"] == before["other"] and after["client"] == 0, (before, after)
    FIGURES["fuzz"] = f"{len(cases)} cases {dict(outcomes)}"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=12), st.integers(4, 64))
def test_property_the_sse_parser_takes_any_bytes_however_chunked_within_its_memory_bound(data, cuts, max_line):
    whole = SSEParser(max_line=max_line)
    expected = whole.feed(data)
    parser = SSEParser(max_line=max_line)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    events = []
    for a, b in zip(bounds, bounds[1:]):
        events += parser.feed(data[a:b])
        assert len(parser._buf) <= max_line, "the parser buffered more than one line's bound"
    assert events == expected
    assert parser.dropped == whole.dropped
    assert all(isinstance(e.data, str) for e in events)


def test_the_sse_parser_does_not_slow_down_on_endless_lines_or_line_ends():
    for stream in (b"x" * (8 << 20), b"\r" * (4 << 20), b"data: y\n" * (1 << 19), b"\r\n" * (2 << 20)):
        parser = SSEParser(max_line=1 << 20)
        started = time.monotonic()
        for at in range(0, len(stream), 4096):
            parser.feed(stream[at:at + 4096])
            assert len(parser._buf) <= 1 << 20
        assert time.monotonic() - started < 5, "quadratic work on a hostile stream"


header_name = st.binary(min_size=0, max_size=12) | st.sampled_from(
    sorted(HOP_BY_HOP | CREDENTIALS) + [b"Connection", b"AUTHORIZATION", b"Api-Key", b"x-a"])
header_list = st.lists(st.tuples(header_name, st.lists(st.binary(max_size=24), min_size=1, max_size=3)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(header_list, st.binary(max_size=6), st.booleans())
def test_property_the_header_filter_takes_any_bytes_and_is_idempotent(headers, prefix, drop_credentials):
    out = request_headers(headers, hop_prefix=prefix.lower(), drop_credentials=drop_credentials)
    named = {t.strip().lower() for n, vs in headers if n.lower() == b"connection" for v in vs for t in v.split(b",")
             if t.strip()}
    for name, _ in out:
        assert name == name.lower() and name not in HOP_BY_HOP and name not in named
        assert not (drop_credentials and name in CREDENTIALS)
        assert name not in (b"host", b"content-length", b"expect")
    assert request_headers(out, hop_prefix=prefix.lower(), drop_credentials=drop_credentials) == out
    back = response_headers(headers)
    assert response_headers(back) == back


toml_scalar = st.one_of(st.text(max_size=24), st.integers(), st.booleans(), st.floats())
toml_value = st.recursive(toml_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
route_table = st.fixed_dictionaries({}, optional={
    "prefix": st.sampled_from(["/a", "b", "/", "/a/../b", "/%2e", ""]) | toml_value,
    "base_url": st.sampled_from(["http://up.test", "https://up.test/v1", "ftp://x", "http://", "http://h:99999"])
    | toml_value,
    "kind": st.sampled_from(["openai", "azure", "general", "other"]) | toml_value,
    "api_keys": st.lists(st.sampled_from(["sk-hyp-key-00000001", "sk-hyp-key:00000002", "x"]), max_size=3) | toml_value,
    "forward_keys": st.lists(st.sampled_from(["fk-hyp-key-00000003", "fk-hyp-key-00000003", "zz"])
                             | st.fixed_dictionaries({"key": st.sampled_from(["fk-hyp-key-00000004", "nope"])},
                                                     optional={"name": st.text(max_size=6), "models": toml_value}),
                             max_size=3) | toml_value,
    "allow_client_keys": st.booleans() | toml_value,
}) | st.dictionaries(st.text(max_size=10), toml_value, max_size=3)
HYP_SECRETS = ("sk-hyp-key-00000001", "sk-hyp-key:00000002", "fk-hyp-key-00000003", "fk-hyp-key-00000004")


@settings(max_examples=300, deadline=None)
@given(st.lists(route_table, max_size=3) | toml_value,
       st.dictionaries(st.sampled_from(sorted(settings_module.SETTING_BY_KEY)), toml_value, max_size=4))
def test_property_any_config_file_data_is_a_config_or_one_clear_line_without_keys(routes, settings_):
    file_data = {"route": routes, **settings_}
    try:
        built = configuration.build(configuration.gather({}, {}, {}, file_data, "f.toml"), file_data, "f.toml")
    except configuration.ConfigError as problem:
        message = str(problem)
        assert message and len(message.splitlines()) == 1
        for secret in HYP_SECRETS:
            assert secret not in message, message
    else:
        assert isinstance(built, configuration.Config) and len(built.routes) == len(routes)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_property_any_config_file_text_is_a_config_or_one_clear_line(tmp_path, text):
    path = tmp_path / "any.toml"
    path.write_text(text, encoding="utf-8")
    try:
        configuration.load({}, environ={}, dotenv_path=None, config_file=str(path))
    except configuration.ConfigError as problem:
        assert len(str(problem).splitlines()) == 1


def test_a_config_file_that_is_not_utf8_stops_startup_with_one_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[[route]]\nbase_url = "http://up.test"\nprefix = "/caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(configuration.ConfigError) as raised:
        configuration.load({}, environ={}, dotenv_path=None, config_file=str(path))
    assert len(str(raised.value).splitlines()) == 1 and str(path) in str(raised.value)


# ---------------------------------------------------------------------------------------------------------------
# 7. the soak


SOAK_KINDS = {  # kind: weight
    "plain": 24, "stream": 30, "abort-stream": 8, "abort-head": 5, "abort-upload": 5, "upstream-500": 6,
    "reset": 6, "unknown-key": 5, "too-large": 5, "silent": 2, "timeout": 2,
}
STREAM_SHAPES = (1, 5, 20)


def expected_replies(upstream: FakeUpstreamProcess) -> dict:
    """What the upstream answers each shape directly, ids and timestamps normalised."""
    expected = {"plain": normalise(call(upstream.port, "POST", "/v1/chat/completions", chat_body("direct"),
                                        auth=None, keep=False).body)}
    for chunks in STREAM_SHAPES:
        reply = call(upstream.port, "POST", "/v1/chat/completions", chat_body("direct", stream=True),
                     {"x-fake-chunks": str(chunks)}, auth=None, keep=False)
        assert reply.status == 200 and reply.body.endswith(b"data: [DONE]\n\n")
        expected[chunks] = normalise(reply.body)
    return expected


def soak_one(port: int, kind: str, user: str, rng: random.Random, expected: dict) -> str | None:
    """Run one soak request of this kind; None when the user saw what they must see, else what went wrong."""
    if kind == "plain":
        reply = call(port, "POST", CHAT, chat_body(user))
        if reply.status != 200 or reply.error or normalise(reply.body) != expected["plain"]:
            return f"plain: {reply!r}"
    elif kind == "stream":
        chunks = rng.choice(STREAM_SHAPES)
        reply = call(port, "POST", CHAT, chat_body(user, stream=True),
                     {"x-fake-chunks": str(chunks), "x-fake-interval": rng.choice(["0", "0.01"])})
        if reply.status != 200 or reply.error or normalise(reply.body) != expected[chunks]:
            return f"stream {chunks}: {reply!r}"
    elif kind in ("abort-stream", "abort-head", "abort-upload"):
        with connect(port) as sock:
            if kind == "abort-stream":
                sock.sendall(raw_request("POST", CHAT, chat_body(user, stream=True),
                                         {"x-fake-chunks": "30", "x-fake-interval": "0.05"}))
                data = b""
                while b"data: " not in data:
                    piece = sock.recv(65536)
                    if not piece:
                        return f"abort-stream: ended before its first event: {data[:200]!r}"
                    data += piece
                if status_of(data) != 200:
                    return f"abort-stream: {data[:200]!r}"
            elif kind == "abort-head":
                sock.sendall(raw_request("POST", CHAT, chat_body(user), {"x-fake-fail": "hang-before-headers"}))
                time.sleep(0.4)
            else:
                sock.sendall(raw_request("POST", CHAT, chat_body(user)[:40], length=100_000))
            if rng.random() < 0.5:
                reset(sock)
    elif kind == "upstream-500":
        reply = call(port, "POST", CHAT, chat_body(user), {"x-fake-status": "500"})
        if reply.status != 500 or reply.json()["error"]["type"] != "server_error" or b"proxy" in reply.body:
            return f"upstream-500: {reply!r}"
    elif kind in ("reset", "silent"):
        fail = "reset-mid-stream" if kind == "reset" else "hang-mid-stream"
        reply = call(port, "POST", CHAT, chat_body(user, stream=True), {"x-fake-fail": fail})
        # Status 0: the proxy's RST arrived before the client read the head; broken all the same.
        if reply.status not in (0, 200) or reply.error is None or b"[DONE]" in reply.body:
            return f"{kind}: the client did not see a broken stream: {reply!r}"
    elif kind == "unknown-key":
        reply = call(port, "POST", CHAT, chat_body(user), auth=f"Bearer fk-not-issued-0000:{PROXY_KEY}")
        if reply.status != 401 or reply.json()["error"]["code"] != "invalid_api_key":
            return f"unknown-key: {reply!r}"
    elif kind == "too-large":
        data, _ = exchange_raw(port, raw_request("POST", CHAT, length=MAX_BODY + 1))
        if status_of(data) != 413:
            return f"too-large: {data[:200]!r}"
    elif kind == "timeout":
        reply = call(port, "POST", CHAT, chat_body(user), {"x-fake-fail": "hang-before-headers"})
        if reply.status != 504:
            return f"timeout: {reply!r}"
    return None


def slow_loris(port: int, results: list) -> None:
    """Trickle a request head one byte a second; note when and how the proxy ends it (give up after a while)."""
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\nX-Loris: ".encode() + b"a" * 200
    with connect(port) as sock:
        started = time.monotonic()
        for byte in head:
            if time.monotonic() - started > HEADER_TIMEOUT_SECONDS + 8:
                results.append(("never cut", time.monotonic() - started, b""))
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], 1.0)
            if readable:
                break
        data, _ = read_all(sock, 5)
        results.append(("ended", time.monotonic() - started, data))


def test_soak_mixed_traffic_at_high_concurrency_keeps_rss_and_fds_flat_and_every_stream_exact(proxy, upstream):
    clients, lorises = 64, 12
    expected = expected_replies(upstream)
    warm_up = min(10.0, SOAK_SECONDS / 4)
    call(proxy.port, "POST", CHAT, chat_body(unique("warm")))
    before = proxy.quiet()
    upstream.reset()
    kinds, weights = zip(*SOAK_KINDS.items())
    done = collections.Counter()
    problems: list[str] = []
    users: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + SOAK_SECONDS
    samples: list[tuple[float, float, int]] = []

    def client(number: int):
        rng = random.Random(number)
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            user = unique(f"soak-{kind}")
            try:
                problem = soak_one(proxy.port, kind, user, rng, expected)
            except Exception as e:  # a client-side timeout or refused connection is a failure too
                problem = f"{kind}: {e!r}"
            with lock:
                users[user] = kind
                done[kind] += 1
                if problem:
                    problems.append(problem)

    def sampler():
        start = time.monotonic()
        while not stop.wait(0.5):
            try:
                samples.append((time.monotonic() - start, rss_mb(proxy.pid), len(os.listdir(f"/proc/{proxy.pid}/fd"))))
            except OSError:
                return

    loris_results: list = []
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    threads += [threading.Thread(target=slow_loris, args=(proxy.port, loris_results)) for _ in range(lorises)]
    watcher = threading.Thread(target=sampler)
    started = time.monotonic()
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(SOAK_SECONDS + 60)
    stop.set()
    watcher.join()
    ran = time.monotonic() - started
    after = proxy.quiet(15)
    end_rss = rss_mb(proxy.pid)
    warm_rss = next((rss for t, rss, _ in samples if t >= warm_up), samples[-1][1])
    total = sum(done.values())
    FIGURES["soak"] = (f"{total} requests in {ran:.0f} s ({total / ran:.0f}/s, {clients} clients + {lorises} slow-loris),"
                       f" RSS after warm-up {warm_rss:.1f} MB, peak {max(s[1] for s in samples):.1f} MB,"
                       f" end {end_rss:.1f} MB; fds before {before['total']}, peak {max(s[2] for s in samples)},"
                       f" after {after['total']}")

    assert not problems, f"{len(problems)} of {total} requests went wrong, e.g. {problems[:5]}"
    assert total >= 20 * SOAK_SECONDS / 10, f"only {total} requests in {ran:.0f} s"
    assert all(done[k] for k in ("plain", "stream", "abort-stream", "reset", "upstream-500")), done
    # Memory and descriptors: flat once warm, whatever the mix of successes, failures and aborts.
    assert end_rss <= warm_rss * 1.2 + 16, FIGURES["soak"]
    assert after["client"] == 0 and after["other"] == before["other"], (before, after)
    assert after["upstream"] <= clients, (before, after)
    # Idle upstream connections close after IDLE_CONNECTION_SECONDS: descriptors come back to where they were.
    def returned():
        census = proxy.census()
        return census if census["total"] <= before["total"] + 2 else None

    settled = wait_until(returned, IDLE_CONNECTION_SECONDS + 10, 0.5)
    FIGURES["soak"] += f", {settled['total'] if settled else proxy.census()['total']} once idle upstream connections closed"
    assert settled, (before, proxy.census())
    # Slow-loris heads were cut at the header deadline, with a 408, while the others were served.
    assert len(loris_results) == lorises
    for how, seconds, data in loris_results:
        assert how == "ended" and status_of(data) == 408, (how, seconds, data[:200])
        assert HEADER_TIMEOUT_SECONDS - 1 <= seconds < HEADER_TIMEOUT_SECONDS + 6, seconds
    # Every exchange that reached the upstream has exactly one transcript; the only others are of clients that
    # left before their request was sent upstream.
    reached = collections.Counter()
    for record in upstream.received():
        if record["uri"] == "/v1/chat/completions" and record["method"] == "POST":
            body = json.loads(base64.b64decode(record["body_base64"]))
            if str(body.get("user", "")).startswith("soak-"):
                reached[body["user"]] += 1
    assert reached and max(reached.values()) == 1, "an exchange was sent upstream twice"
    logged = collections.Counter(r["request"]["user"] for r in proxy.transcripts()
                                 if isinstance(r.get("request"), dict)
                                 and str(r["request"].get("user", "")).startswith("soak-"))
    assert not [u for u in reached if logged[u] != 1], "a transcript is missing or doubled"
    extra = [u for u in logged if u not in reached]
    assert all(users.get(u) == "abort-head" and logged[u] == 1 for u in extra), extra[:5]
    FIGURES["soak transcripts"] = f"{sum(logged.values())} records for {len(reached)} exchanges that reached the upstream"


# ---------------------------------------------------------------------------------------------------------------
# 8. secrets: last, over everything the suite's daemon wrote and answered


def test_no_key_appears_in_any_log_transcript_or_error_body(proxy, upstream):
    upstream.reset()
    uses = [
        (AUTH, 200), (f"Bearer {CLIENT_KEY}:{PROXY_KEY}", 200), (f"Bearer fk-faults-wrong-0000:{PROXY_KEY}", 401),
        (f"Bearer {FORWARD_KEY}:px-wrong-gate-0000", 401), (f"Bearer {FORWARD_KEY}", 401), (f"Bearer {PROXY_KEY}", 401),
    ]
    for auth, status in uses:
        reply = call(proxy.port, "POST", CHAT + f"?api_key={CLIENT_KEY}", chat_body(unique("secrets")), auth=auth)
        assert reply.status == status, (auth, reply)
        EVIDENCE.append(("secrets", reply.body + json.dumps(reply.headers).encode()))
    keys = [r["key"] for r in upstream.received()]
    assert keys[0] in POOL_KEYS and keys[1] == CLIENT_KEY, "the daemon did not run with the keys under test"
    transcripts_dir = proxy.home / "Log"
    proxy.stop()
    log = proxy.log()
    assert "POST /openai/v1/chat/completions 401" in log, "the access log is not in the evidence"
    files = [(str(p), p.read_bytes()) for p in transcripts_dir.rglob("*") if p.is_file()]
    assert sum(data.count(b'"status":200') for _, data in files) >= 2, "the transcripts are not in the evidence"
    evidence = [("twistd log", log.encode()), *files, *EVIDENCE]
    for secret in SECRETS:
        core = secret.split("-", 1)[1]  # the key without its sk-/fk-/px- prefix
        leaks = [where for where, text in evidence if secret.encode() in text or core.encode() in text]
        assert not leaks, f"{secret[:6]}… leaked into {leaks[:5]}"
    FIGURES["secrets checked"] = f"{len(evidence)} logs, transcript files and answers"
