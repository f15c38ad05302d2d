#!/usr/bin/env python3
"""Side-by-side benchmark: this project (fwd) vs openai-forward 0.8.1 vs nginx.

    python benchmarks/run.py [--duration 5] [--rounds 2] [--only fwd,reference,nginx]
                             [--json out.json] [--pin] [--fwd-env LOG_CHAT=true] [--baseline REV]

Columns: fwd (this checkout as installed), fwd+chat (transcripts on), fwd+limits (every request through a
forward key with an rpm, a tpm and a token budget, usage counted into the ledger), fwd+redis (fwd+limits with
those limits shared through a redis-server this script starts on loopback), fwd+cache-hit (the response cache
on: every request after the first is answered from it), fwd@REV (the code of git revision
REV, from --baseline, for a before/after in one run), fwd-workers=N (fwd with --workers N; N may be auto: one per
core), reference (openai-forward 0.8.1), nginx.

Starts benchmarks/upstream.py (fake OpenAI upstream) and the three proxies on
their own 127.0.0.1 ports, all pointing at that upstream, then measures, rounds
alternating between the proxies so machine noise hits all of them alike:

  a. plain     wrk, 32 connections, POST /v1/chat/completions (small JSON) -> req/s, errors, p50/p99
  b. streams   wrk, 200 connections, "stream": true, 20 SSE chunks each -> completed streams/s, errors
  c. latency   sequential requests through the proxy minus direct to the upstream (p50/p99),
               and added time-to-first-chunk of a stream with 0.05 s between chunks
  h. half      plain requests paced at half the rate a. measured for that proxy in the same round (16
               connections, wrk's delay()), then the same pace direct to the upstream: p99 through the proxy
               minus p99 direct = added p99 at half load
  d. RSS       holding 2,000 concurrent open streams (1 chunk/s) -> KB per open stream
  e. slow      a client reading a 200 MB body slowly -> proxy RSS growth (backpressure)
  f. realtime  (fwd only) the Realtime API over WebSocket, through a fresh fwd to an echo upstream
               (benchmarks/realtime.py): added latency per frame p50/p99, and KB per session with 200 open

a-c and h run every round; d and e run once, after the rounds (--mem-rounds to repeat); f runs once, last.
Everything runs on loopback, every load is bounded in time, and everything started here is stopped
on exit, Ctrl-C or error. Temp files live in one temp dir that is removed at the end (--keep-tmp).
"""

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
UPSTREAM_PY = HERE / "upstream.py"
REF_VENV = HERE / ".venv-reference"
REF_PKGS = ["openai-forward==0.8.1", "pyyaml"]  # it imports yaml without declaring it
# fwd+chat: this proxy with LOG_CHAT=true; fwd+limits: with limits and a budget on the forward key every request
# uses; fwd+redis: fwd+limits deciding through Redis; fwd+cache-hit: the response cache answering (the load repeats
# one request); fwd@REV: the revision given with --baseline; fwd-workers=N: fwd with WORKERS=N (a number or auto)
PROXIES = ("fwd", "fwd+chat", "fwd+limits", "fwd+redis", "fwd+cache-hit", "fwd@", "fwd-workers=", "reference",
           "nginx")
WORKERS_COLUMN = re.compile(r"fwd-workers=(\d+|auto)$")
HOST = "127.0.0.1"

CHAT_BODY = '{"model":"gpt-3.5-turbo","messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
STREAM_BODY = (
    '{"model":"gpt-3.5-turbo","stream":true,'
    '"messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
)
AUTH = "Bearer sk-bench-000000000000000000000000000000000000"
LIMITED_KEY = "fk-bench-limits-0000000000000000000000000"
# Limits no benchmark reaches, so every request pays for the checks and none is refused.
LIMITS_TOML = """\
[[route]]
base_url = "http://{host}:{up_port}"
api_keys = ["{pool}"]
forward_keys = [
  {{ key = "{key}", name = "bench", rpm = "1000000000/minute", tpm = "1000000000/minute", budget = {{ tokens = 1000000000000000, period = "month" }} }},
]
"""
# The Authorization each proxy port is sent (fwd+limits takes its forward key); AUTH elsewhere.
AUTH_BY_PORT = {}


def auth(port):
    return AUTH_BY_PORT.get(port, AUTH)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def base_env():
    """A small, predictable environment: no OPENAI_* / FORWARD_* leaking from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class Proc:
    """A child started in its own session, so Ctrl-C in the terminal reaches only us and we stop it."""

    def __init__(self, name, cmd, env, cwd, logfile, cpus=None):
        self.name = name
        self.cmd = list(cmd)
        if cpus is not None and shutil.which("taskset"):
            self.cmd = ["taskset", "-c", cpus] + self.cmd
        self.logfile = logfile
        self._log = open(logfile, "wb")
        self.popen = subprocess.Popen(
            self.cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.popen.pid
        self.stopped = False

    def alive(self):
        return self.popen.poll() is None

    def tail(self, n=15):
        try:
            lines = Path(self.logfile).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    | " + line for line in lines[-n:])

    def stop(self):
        if self.stopped:
            return
        self.stopped = True
        if self.alive():
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 3.0)):
                try:
                    os.killpg(self.pid, sig)  # its own process group (start_new_session)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # the leader is gone; make sure nothing it left in its group survives
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def proc_children():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pids(root):
    kids = proc_children()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def rss_kb(pids):
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def cpu_seconds(pids):
    """User + system CPU seconds used so far by these processes (from /proc)."""
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def serving_pids(proc):
    """The proxy's processes: the whole tree under the started pid, minus a `taskset` wrapper (it execs)."""
    return tree_pids(proc.pid)


def http_get_ok(port, path="/v1/models", timeout=2.0):
    try:
        c = http.client.HTTPConnection(HOST, port, timeout=timeout)
        c.request("GET", path, headers={"Authorization": auth(port)})
        r = c.getresponse()
        r.read()
        c.close()
        return r.status == 200
    except (OSError, http.client.HTTPException):
        return False


def wait_ready(proc, port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            return "exited with code %s" % proc.popen.returncode
        if http_get_ok(port, timeout=1.0):
            return None
        time.sleep(0.2)
    return "no 200 on GET /v1/models within %.0f s" % timeout


# --------------------------------------------------------------------------- proxies

def fwd_command(args, port, up_port, extra_env=(), extra_args=(), twistd_args=()):
    if args.fwd_cmd:
        cmd = shlex.split(args.fwd_cmd.format(port=port, upstream=up_port, python=sys.executable))
    else:
        twistd = Path(sys.executable).parent / "twistd"
        if not twistd.exists():
            twistd = shutil.which("twistd")
            if not twistd:
                return None, "no twistd next to %s nor on PATH" % sys.executable
        cmd = [str(twistd), "-n", "--pidfile=", *twistd_args, "openai-forward", "--port",
               "tcp:%d:interface=%s" % (port, HOST), *extra_args]
    env = base_env()
    env["OPENAI_BASE_URL"] = "http://%s:%d" % (HOST, up_port)
    for kv in [*args.fwd_env, *extra_env]:
        k, _, v = kv.partition("=")
        env[k] = v
    return (cmd, env), None


def checkout(rev, tmp):
    """The files of git revision `rev` of this repository in a temp directory, or an error."""
    tree = os.path.join(tmp, "fwd@" + rev.replace("/", "_"))
    if os.path.isdir(tree):
        return tree, None
    os.makedirs(tree)
    try:
        archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev], capture_output=True, check=True,
                                 timeout=60)
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as e:
        return None, "cannot check out %s: %s" % (rev, getattr(e, "stderr", b"") or e)
    return tree, None


def ensure_reference_venv():
    py = REF_VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import openai_forward, yaml"],
                                      capture_output=True).returncode == 0:
        return py, None
    log("reference: creating %s and installing %s (first use only) ..." % (REF_VENV, " ".join(REF_PKGS)))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(REF_VENV)], check=True, timeout=300,
                       capture_output=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"] + REF_PKGS,
                           timeout=900, capture_output=True, text=True)
    except (subprocess.SubprocessError, OSError) as e:
        return None, "venv/pip failed: %s" % e
    if r.returncode != 0:
        return None, "pip install failed: %s" % (r.stderr.strip().splitlines() or ["?"])[-1]
    return py, None


def reference_command(args, port, up_port):
    py, err = ensure_reference_venv()
    if err:
        return None, err
    env = base_env()
    env["FORWARD_CONFIG"] = json.dumps([{"base_url": "http://%s:%d" % (HOST, up_port), "route": "/", "type": "openai"}])
    if args.reference_aifd:
        cmd = [str(REF_VENV / "bin" / "aifd"), "run", "--port", str(port)]  # binds 0.0.0.0
    else:
        # exactly what `aifd run --port N` does (openai_forward/__main__.py: Cli.run), but bound to loopback
        cmd = [str(py), "-c",
               "import uvicorn; uvicorn.run(app='openai_forward.app:app', host='%s', port=%d, workers=1, "
               "app_dir='..')" % (HOST, port)]
    return (cmd, env), None


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream fake_openai {{
        server {host}:{up};
        keepalive 64;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://fake_openai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


def nginx_command(args, port, up_port, tmp):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        return None, "nginx not installed"
    d = Path(tmp) / "nginx"
    d.mkdir(exist_ok=True)
    # as root the workers would switch to `nobody`; keep them as the current user
    user = "user %s;" % __import__("pwd").getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else ""
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, d=d, host=HOST, up=up_port, port=port))
    return ([nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")], base_env()), None


# --------------------------------------------------------------------------- load: wrk

WRK_PLAIN = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "{auth}"
"""

WRK_STREAM = WRK_PLAIN + """\
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  -- a stream counts as completed only with a 200 and the final [DONE] event
  if status ~= 200 or not string.find(body, "data: [DONE]", 1, true) then bad = bad + 1 end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + t:get("bad") end
  io.write(string.format("BENCH_BAD %d\\n", b))
end
"""

# Pacing for h: each connection waits `delay()` ms between a response and its next request; a fractional mean
# is reached by choosing between the two whole numbers around it (wrk's timers count whole milliseconds).
WRK_PACED = WRK_PLAIN + """\
function init(args) math.randomseed(os.time() + math.floor(os.clock() * 1e6)) end
function delay()
  if math.random() < {fraction} then return {whole} + 1 end
  return {whole}
end
"""
PACED_CONNECTIONS = 16

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(tok):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", tok)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def run_wrk(url, script, conns, duration, threads, cpus):
    cmd = ["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % duration, "--timeout", "10s", "--latency",
           "-s", script, url]
    if cpus is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus] + cmd
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        return {"error": "wrk timed out"}
    out = r.stdout
    res = {"raw": out[-2000:]}
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not m:
        res["error"] = "wrk: " + (r.stderr.strip() or out.strip())[-300:]
        return res
    res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        res["requests"] = int(m.group(1))
        res["seconds"] = _ms(m.group(2) + m.group(3)) / 1e3
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(map(int, m.groups())) if m else 0
    if m and res["socket_errors"]:
        res["socket_error_kinds"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    res["errors"] = res["non2xx"] + res["socket_errors"]
    for pct in ("50", "99"):
        m = re.search(r"^\s*%s(?:\.000)?%%\s+(\S+)" % pct, out, re.M)
        res["p%s_ms" % pct] = _ms(m.group(1)) if m else None
    m = re.search(r"BENCH_BAD (\d+)", out)
    if m:
        res["bad_streams"] = int(m.group(1))
        done = res.get("requests", 0) - res["bad_streams"]
        res["completed"] = done
        res["completed_per_s"] = done / res["seconds"] if res.get("seconds") else None
        res["errors"] = res["bad_streams"] + res["socket_errors"]
    return res


# --------------------------------------------------------------------------- c. added latency

def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class KeepAliveClient:
    def __init__(self, port):
        self.port = port
        self.conn = None

    def post(self, path, body):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
            try:
                t0 = time.perf_counter()
                self.conn.request("POST", path, body=body,
                                  headers={"Content-Type": "application/json", "Authorization": auth(self.port)})
                r = self.conn.getresponse()
                r.read()
                dt = time.perf_counter() - t0
                if r.status != 200:
                    raise http.client.HTTPException("status %d" % r.status)
                if r.will_close:
                    self.conn.close()
                    self.conn = None
                return dt
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt:
                    return None
        return None

    def close(self):
        if self.conn is not None:
            self.conn.close()


def added_latency(port, up_port, n, warm):
    """Alternate direct / proxied requests so both see the same noise; return ms figures."""
    px, dx = KeepAliveClient(port), KeepAliveClient(up_port)
    prox, direct, fails = [], [], 0
    deadline = time.monotonic() + 30
    for i in range(warm + n):
        if time.monotonic() > deadline:
            break
        d = dx.post("/v1/chat/completions", CHAT_BODY)
        p = px.post("/v1/chat/completions", CHAT_BODY)
        if i < warm:
            continue
        if p is None:
            fails += 1
        elif d is not None:
            prox.append(p * 1e3)
            direct.append(d * 1e3)
    px.close()
    dx.close()
    if not prox:
        return {"error": "no successful proxied request", "fails": fails}
    return {
        "n": len(prox), "fails": fails,
        "proxy_p50_ms": pct(prox, 50), "proxy_p99_ms": pct(prox, 99),
        "direct_p50_ms": pct(direct, 50), "direct_p99_ms": pct(direct, 99),
        "added_p50_ms": pct(prox, 50) - pct(direct, 50),
        "added_p99_ms": pct(prox, 99) - pct(direct, 99),
    }


def half_load(url, port, up_url, up_port, saturated, latency_ms, duration, cpus, tmp):
    """h: plain requests at half the saturated rate `saturated`, through the proxy and then direct to the upstream
    at the same pace; wrk's p50/p99 of each and the p99 the proxy adds."""
    target = saturated / 2.0
    # Each connection's cycle is one response time plus its delay: PACED_CONNECTIONS cycles make `target`.
    delay_ms = max(0.0, PACED_CONNECTIONS * 1000.0 / target - latency_ms)
    found = {"target_rps": target, "delay_ms": delay_ms}
    for who, where, at in (("proxy", url, port), ("direct", up_url, up_port)):
        script = os.path.join(tmp, "paced.%d.lua" % at)
        Path(script).write_text(WRK_PACED.format(body=CHAT_BODY, auth=auth(at), whole=int(delay_ms),
                                                 fraction="%.3f" % (delay_ms - int(delay_ms))))
        r = run_wrk(where, script, PACED_CONNECTIONS, duration, 1, cpus)
        if "rps" not in r:
            return {"error": "%s: %s" % (who, r.get("error"))}
        found[who] = {k: r.get(k) for k in ("rps", "p50_ms", "p99_ms", "errors")}
    found["rps"] = found["proxy"]["rps"]
    found["of_saturated"] = found["rps"] / saturated
    found["p99_ms"] = found["proxy"]["p99_ms"]
    found["errors"] = found["proxy"]["errors"]
    if found["proxy"]["p99_ms"] is not None and found["direct"]["p99_ms"] is not None:
        found["added_p99_ms"] = found["proxy"]["p99_ms"] - found["direct"]["p99_ms"]
    return found


def first_chunk_time(port, path, timeout=5.0):
    """Seconds from sending a streamed request to the first body byte; reads the stream to its end."""
    req = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nAuthorization: %s\r\n"
           "Content-Length: %d\r\nConnection: close\r\n\r\n%s"
           % (path, HOST, port, auth(port), len(STREAM_BODY), STREAM_BODY)).encode()
    s = socket.create_connection((HOST, port), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(req)
        buf, first = b"", None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            data = s.recv(65536)
            if not data:
                break
            buf += data
            if first is None:
                h = buf.find(b"\r\n\r\n")
                if h >= 0 and len(buf) > h + 4:
                    if not buf.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                        return None
                    first = time.perf_counter() - t0
            if b"[DONE]" in buf and (buf.endswith(b"0\r\n\r\n") or b"chunked" not in buf[:buf.find(b"\r\n\r\n")].lower()):
                break
        return first
    finally:
        s.close()


def added_ttfc(port, up_port, n):
    path = "/v1/chat/completions?chunks=3&interval=0.05"
    prox, direct = [], []
    for i in range(n + 2):
        try:
            d = first_chunk_time(up_port, path)
            p = first_chunk_time(port, path)
        except OSError:
            continue
        if i < 2 or d is None or p is None:
            continue
        prox.append(p * 1e3)
        direct.append(d * 1e3)
    if not prox:
        return {"error": "no stream through the proxy"}
    return {"n": len(prox), "proxy_p50_ms": pct(prox, 50), "direct_p50_ms": pct(direct, 50),
            "added_ttfc_p50_ms": pct(prox, 50) - pct(direct, 50),
            "added_ttfc_p99_ms": pct(prox, 99) - pct(direct, 99)}


# --------------------------------------------------------------------------- d. RSS per open stream

async def _hold_streams(port, n, pids_fn, ramp_timeout, chunks):
    loop = asyncio.get_running_loop()
    body = STREAM_BODY.encode()
    req = (b"POST /v1/chat/completions?chunks=%d&interval=1 HTTP/1.1\r\nHost: %s:%d\r\n"
           b"Content-Type: application/json\r\nAuthorization: %s\r\nContent-Length: %d\r\n\r\n%s"
           % (chunks, HOST.encode(), port, auth(port).encode(), len(body), body))
    state = {"first": 0, "bad": 0, "lost": 0, "alive": 0, "bad_alive": 0}
    transports = []
    all_done = loop.create_future()
    settled = [0]

    def settle():
        settled[0] += 1
        if settled[0] == n and not all_done.done():
            all_done.set_result(None)

    class P(asyncio.Protocol):
        def __init__(self):
            self.buf = b""
            self.state = 0  # 0 waiting, 1 streaming, 2 lost, 3 non-200

        def connection_made(self, t):
            transports.append(t)
            state["alive"] += 1
            t.write(req)

        def data_received(self, data):
            if self.state:
                return
            self.buf += data
            h = self.buf.find(b"\r\n\r\n")
            if h < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 200"):
                self.state = 3
                state["bad"] += 1
                state["bad_alive"] += 1
                settle()
            elif len(self.buf) > h + 4:
                self.state = 1
                self.buf = b""
                state["first"] += 1
                settle()

        def connection_lost(self, exc):
            state["alive"] -= 1
            if self.state == 3:
                state["bad_alive"] -= 1
            elif self.state == 1:
                state["first"] -= 1
                state["lost"] += 1
            elif self.state == 0:
                state["lost"] += 1
                settle()
            self.state = 2

    sem = asyncio.Semaphore(100)  # bound the SYN burst (listen backlogs differ: twisted 50, nginx 4096)

    async def one():
        async with sem:
            try:
                await asyncio.wait_for(loop.create_connection(P, HOST, port), 5)
            except (OSError, asyncio.TimeoutError):
                state["lost"] += 1
                settle()

    before = rss_kb(pids_fn())
    t0 = time.monotonic()
    tasks = [loop.create_task(one()) for _ in range(n)]
    try:
        await asyncio.wait_for(asyncio.shield(all_done), ramp_timeout)
    except asyncio.TimeoutError:
        pass
    ramp = time.monotonic() - t0
    samples = []
    for _ in range(3):
        await asyncio.sleep(0.3)
        samples.append(rss_kb(pids_fn()))
    during = statistics.median(samples)
    open_now = state["first"]
    held = state["alive"] - state["bad_alive"]  # established: streaming, or still waiting inside the proxy
    snap = dict(state)
    for t in tasks:
        t.cancel()
    for t in transports:
        t.abort()
    await asyncio.sleep(0.2)
    return {"requested": n, "open": open_now, "held": held, "failed": snap["bad"], "lost": snap["lost"],
            "ramp_s": round(ramp, 2), "rss_before_kb": before, "rss_during_kb": during,
            "growth_mb": (during - before) / 1024.0,
            "kb_per_stream": (during - before) / held if held else None}


def hold_streams(port, n, pids_fn, ramp_timeout=12.0, chunks=18):
    return asyncio.run(_hold_streams(port, n, pids_fn, ramp_timeout, chunks))


# --------------------------------------------------------------------------- e. slow reader

def slow_reader(port, pids_fn, seconds, size):
    pids = pids_fn()
    before = rss_kb(pids)
    peak = before
    got = 0
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.settimeout(2.0)
    try:
        s.connect((HOST, port))
        s.sendall(b"GET /bytes?n=%d HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: %s\r\n\r\n"
                  % (size, HOST.encode(), port, auth(port).encode()))
        t0 = time.monotonic()
        next_sample = t0
        while True:
            now = time.monotonic()
            if now - t0 > seconds:
                break
            if now >= next_sample:
                peak = max(peak, rss_kb(pids))
                next_sample = now + 0.2
            try:
                data = s.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            got += len(data)
            if got >= size:
                break
            time.sleep(0.01)  # <= 64 KiB per 10 ms: ~6 MB/s, far below what the upstream pushes
        peak = max(peak, rss_kb(pids))
        elapsed = time.monotonic() - t0
    except OSError as e:
        return {"error": str(e)}
    finally:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # abort (RST)
        s.close()
    return {"rss_before_kb": before, "rss_peak_kb": peak, "growth_mb": (peak - before) / 1024.0,
            "received_mb": got / 1048576.0, "seconds": round(elapsed, 2)}


def profile_summary(path, served, top=12):
    """The largest own-time costs of a cProfile stats file, per request served."""
    import pstats

    for _ in range(50):
        if os.path.exists(path):
            break
        time.sleep(0.1)
    try:
        stats = pstats.Stats(path)
    except (OSError, TypeError, EOFError) as e:
        return {"error": "no profile written: %s" % e, "served": served, "top": []}
    served = max(served, 1)
    rows = []
    for (filename, line, function), (_, calls, own, total, _) in stats.stats.items():
        where = "%s:%d(%s)" % (os.path.basename(filename), line, function) if line else function
        rows.append({"function": where, "calls": calls / served, "own_us": own / served * 1e6,
                     "total_us": total / served * 1e6})
    rows.sort(key=lambda row: row["own_us"], reverse=True)
    return {"served": served, "top": rows[:top]}


def per_request(result, cpu, count_key):
    """Add the proxy's CPU time per request (or completed stream) of a wrk run, in microseconds."""
    count = result.get(count_key)
    if isinstance(count, (int, float)) and count > 0:
        result["cpu_us"] = cpu / count * 1e6


# --------------------------------------------------------------------------- report

METRICS = [
    # (label, section, key, better, fmt)
    ("plain req/s", "plain", "rps", "higher", "%.0f"),
    ("plain errors", "plain", "errors", "lower", "%.0f"),
    ("plain p50 ms (wrk)", "plain", "p50_ms", "lower", "%.2f"),
    ("plain p99 ms (wrk)", "plain", "p99_ms", "lower", "%.2f"),
    ("CPU µs per plain request", "plain", "cpu_us", "lower", "%.0f"),
    ("completed streams/s", "streams", "completed_per_s", "higher", "%.0f"),
    ("CPU µs per completed stream", "streams", "cpu_us", "lower", "%.0f"),
    ("stream errors", "streams", "errors", "lower", "%.0f"),
    ("added latency p50 ms", "latency", "added_p50_ms", "lower", "%.3f"),
    ("added latency p99 ms", "latency", "added_p99_ms", "lower", "%.3f"),
    ("added TTFC p50 ms", "ttfc", "added_ttfc_p50_ms", "lower", "%.3f"),
    ("req/s paced at half the saturated rate", "half", "rps", "info", "%.0f"),
    ("p99 ms at half rate (wrk)", "half", "p99_ms", "lower", "%.2f"),
    ("added p99 ms at half rate", "half", "added_p99_ms", "lower", "%.2f"),
    ("RSS idle after load MB", "idle", "rss_kb", "lower", "%.1f"),
    ("RSS fresh process MB", "hold", "rss_before_kb", "lower", "%.1f"),
    ("streams open of {streams} (first chunk seen)", "hold", "open", "higher", "%.0f"),
    ("RSS growth holding them MB", "hold", "growth_mb", "lower", "%.1f"),
    ("KB per held stream", "hold", "kb_per_stream", "lower", "%.1f"),
    ("slow reader RSS growth MB", "slow", "growth_mb", "lower", "%.1f"),
    ("slow reader MB delivered", "slow", "received_mb", "info", "%.1f"),
]


def value_of(rounds, section, key):
    vals = []
    for r in rounds:
        v = r.get(section, {}).get(key)
        if isinstance(v, (int, float)):
            vals.append(v / 1024.0 if key in ("rss_before_kb", "rss_kb") else v)
    return statistics.median(vals) if vals else None


def render(results, names, fmt_notes):
    cols = names + (["upstream"] if results.get("upstream") else [])
    head = ["metric"] + cols
    ratios = [("fwd/" + n, n) for n in names if n != "fwd"] if "fwd" in names else []
    head += [r[0] for r in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, section, key, better, fmt in METRICS:
        row = [label.format(streams=results["config"]["streams"]) + ("" if better == "info" else (" ↑" if better == "higher" else " ↓"))]
        vals = {}
        for n in cols:
            st = results["proxies"].get(n) if n != "upstream" else {"rounds": results["upstream"]}
            if st is None or st.get("failed"):
                row.append("failed to start" if st and st.get("failed") else "-")
                continue
            v = value_of(st["rounds"], section, key)
            vals[n] = v
            row.append(fmt % v if v is not None else "-")
        for _, other in ratios:
            a, b = vals.get("fwd"), vals.get(other)
            ok = a is not None and b is not None and key != "errors" and a >= 0 and b > 0
            row.append("%.2fx" % (a / b) if ok else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + [""] + fmt_notes)


# --------------------------------------------------------------------------- main

def _on_signal(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of a-c, alternating proxies (default 2)")
    ap.add_argument("--mem-rounds", type=int, default=1, help="rounds of d-e, after the others (default 1)")
    ap.add_argument("--only", default="fwd,reference,nginx",
                    help="comma list of fwd,fwd+chat,fwd+limits,fwd+redis,fwd+cache-hit,fwd-workers=N,reference,nginx "
                         "(fwd+chat: with transcripts on; fwd+limits: limits, a budget and usage counting on every "
                         "request; fwd+redis: the same limits shared through a local redis-server; fwd+cache-hit: "
                         "answered by the response cache; fwd-workers=N: --workers N, N a number or auto)")
    ap.add_argument("--skip", default="", help="comma list of tests to skip: plain,streams,latency,half,mem,slow,realtime")
    ap.add_argument("--realtime-sessions", type=int, default=200, help="sessions held at once for f (default 200)")
    ap.add_argument("--realtime-frames", type=int, default=2000, help="frames timed one by one for f (default 2000)")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--fwd-cmd", help="override the fwd command; {port} {upstream} {python} are substituted")
    ap.add_argument("--fwd-env", action="append", default=[], metavar="KEY=VAL", help="extra env for fwd (repeatable)")
    ap.add_argument("--baseline", metavar="REV",
                    help="git revision to run as the column fwd@REV beside fwd (e.g. main~3, a commit hash)")
    ap.add_argument("--reference-aifd", action="store_true",
                    help="run the reference literally as `aifd run --port N` (binds 0.0.0.0)")
    ap.add_argument("--pin", action="store_true",
                    help="taskset: proxy on CPU 0, upstream + load generators on CPU 1")
    ap.add_argument("--joined-streams", action="store_true",
                    help="upstream sends each whole stream in one write (default: one send per SSE event); "
                         "raises the upstream's ceiling, hides per-chunk costs")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--streams", type=int, default=2000, help="concurrent streams for the RSS test")
    ap.add_argument("--slow-seconds", type=float, default=8.0)
    ap.add_argument("--latency-n", type=int, default=300)
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--profile", metavar="FILE",
                    help="run the fwd column under cProfile (twistd --profiler=cprofile), write the stats to FILE and "
                         "print its largest costs per request served; implies --skip mem,slow")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if args.baseline and not any(n.startswith("fwd@") for n in names):
        names.insert(1 if "fwd" in names else 0, "fwd@" + args.baseline)
    bad = [n for n in names if n in ("fwd@", "fwd-workers=")
           or (n not in PROXIES and not n.startswith("fwd@") and not WORKERS_COLUMN.match(n))]
    if bad:
        ap.error("unknown proxy %s (choose from %s)" % (bad, ", ".join(PROXIES)))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.profile:
        skip |= {"mem", "slow", "realtime"}  # they restart the process, which would write over the profile
    if not shutil.which("wrk"):
        ap.error("wrk is required (apt-get install wrk)")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    except (ValueError, OSError):
        pass
    need = args.streams * 2 + 200  # proxy: client + upstream socket per stream (children inherit the limit)
    if soft < need:
        new = max(100, (soft - 200) // 2)
        log("RLIMIT_NOFILE %d is too low for %d streams; using %d" % (soft, args.streams, new))
        args.streams = new

    pin_proxy = "0" if args.pin else None
    pin_load = "1" if args.pin else None

    signal.signal(signal.SIGINT, _on_signal)  # also when started in the background with SIGINT ignored
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    tmp = tempfile.mkdtemp(prefix="fwd-bench-")
    procs = []
    results = {
        "config": {k: v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "nofile": soft,
                    "pinning": "proxy CPU0, upstream+wrk+clients CPU1" if args.pin else "none"},
        "proxies": {}, "upstream": [],
    }
    results["machine"]["loadavg_start"] = " ".join(open("/proc/loadavg").read().split()[:3])
    t_start = time.monotonic()
    try:
        if args.pin:
            os.sched_setaffinity(0, {1})  # our own Python clients share the load core
        up_port = free_port()
        up = Proc("upstream", [sys.executable, str(UPSTREAM_PY), "--port", str(up_port), "--chunks", "20",
                               "--interval", "0"] + (["--joined"] if args.joined_streams else []), base_env(), tmp, os.path.join(tmp, "upstream.log"), pin_load)
        procs.append(up)
        err = wait_ready(up, up_port, 10)
        if err:
            raise SystemExit("fake upstream failed to start: %s\n%s" % (err, up.tail()))
        log("upstream on :%d (%s)" % (up_port, Path(up.logfile).read_text().strip()))

        live = {}
        starts = {}
        shared = {}

        def redis():
            """The URL of the one redis-server of this run (started on first use, no persistence), or an error."""
            if "url" not in shared:
                server = shutil.which("redis-server")
                if not server:
                    return None, "redis-server is not installed (apt-get install redis-server)"
                redis_port = free_port()
                p = Proc("redis", [server, "--bind", HOST, "--port", str(redis_port), "--save", "",
                                   "--appendonly", "no", "--dir", tmp], base_env(), tmp,
                         os.path.join(tmp, "redis.log"), pin_load)
                procs.append(p)
                deadline = time.monotonic() + 10
                while True:
                    try:
                        socket.create_connection((HOST, redis_port), timeout=1).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline or not p.alive():
                            return None, "redis-server did not start:\n" + p.tail()
                        time.sleep(0.05)
                shared["url"] = "redis://%s:%d/0" % (HOST, redis_port)
            return shared["url"], None

        def start_proxy(name):
            """Start (or restart) one proxy on a fresh port; returns an error string or None."""
            port = free_port()
            if name == "fwd":
                profiling = (["--profile=" + os.path.abspath(args.profile), "--profiler=cprofile", "--savestats"]
                             if args.profile else [])
                spec, err = fwd_command(args, port, up_port, twistd_args=profiling)
            elif name == "fwd+chat":
                spec, err = fwd_command(args, port, up_port, ["LOG_CHAT=true", "LOG_DIR=Log"])
            elif name == "fwd+cache-hit":
                spec, err = fwd_command(args, port, up_port, ["CACHE=true", "DATA_DIR=Data"])
            elif name in ("fwd+limits", "fwd+redis"):
                toml = os.path.join(tmp, "limits.toml")
                Path(toml).write_text(LIMITS_TOML.format(host=HOST, up_port=up_port, pool=AUTH.split()[1],
                                                         key=LIMITED_KEY))
                extra, err = ["DATA_DIR=Data"], None
                if name == "fwd+redis":
                    redis_url, err = redis()
                    extra.append("REDIS_URL=" + (redis_url or ""))
                spec, err = (None, err) if err else fwd_command(args, port, up_port, extra, ["--config", toml])
                AUTH_BY_PORT[port] = "Bearer " + LIMITED_KEY
            elif WORKERS_COLUMN.match(name):
                spec, err = fwd_command(args, port, up_port, ["WORKERS=" + WORKERS_COLUMN.match(name).group(1)])
            elif name.startswith("fwd@"):
                tree, err = checkout(name[4:], tmp)
                spec, err = (None, err) if err else fwd_command(args, port, up_port, ["PYTHONPATH=" + tree])
            elif name == "reference":
                spec, err = reference_command(args, port, up_port)
            else:
                spec, err = nginx_command(args, port, up_port, tmp)
            st = results["proxies"].setdefault(name, {"rounds": [], "mem_rounds": []})
            st["port"] = port
            if err:
                return err
            cmd, env = spec
            st["cmd"] = cmd
            wd = os.path.join(tmp, name)
            os.makedirs(wd, exist_ok=True)
            starts[name] = starts.get(name, 0) + 1
            p = Proc(name, cmd, env, wd, os.path.join(tmp, "%s.%d.log" % (name, starts[name])), pin_proxy)
            procs.append(p)
            err = wait_ready(p, port, args.start_timeout)
            if err:
                log("    $ %s\n%s" % (" ".join(map(shlex.quote, cmd)), p.tail()))
                p.stop()
                return err
            live[name] = p
            return None

        def stop_proxy(name):
            p = live.pop(name, None)
            if p is not None:
                st = results["proxies"][name]
                st.setdefault("log_tail", []).append(p.tail(20))
                p.stop()

        for name in names:
            err = start_proxy(name)
            if err:
                results["proxies"][name]["failed"] = err
                log("%s: failed to start: %s" % (name, err))
            else:
                log("%s on :%d (pids %s)" % (name, results["proxies"][name]["port"], tree_pids(live[name].pid)))

        def drained(name, port, limit=40.0):
            """Wait (bounded) until the proxy answers promptly again and its RSS is steady."""
            time.sleep(1.0)
            t0 = time.monotonic()
            while not http_get_ok(port, timeout=2.0):
                if time.monotonic() - t0 > limit:
                    log("%s still not answering after %.0f s; measuring anyway" % (name, limit))
                    return
                time.sleep(0.5)
            last = rss_kb(pids_of(name)())
            for _ in range(20):
                time.sleep(0.5)
                now = rss_kb(pids_of(name)())
                if abs(now - last) < 1024:
                    return
                last = now

        def pids_of(name):
            return lambda: serving_pids(live[name])

        scripts = {}

        def lua(kind, port):
            """The wrk script of one kind ("plain", "stream") with the Authorization this port takes."""
            key = (kind, auth(port))
            if key not in scripts:
                scripts[key] = os.path.join(tmp, "%s.%d.lua" % (kind, len(scripts)))
                template, body = (WRK_PLAIN, CHAT_BODY) if kind == "plain" else (WRK_STREAM, STREAM_BODY)
                Path(scripts[key]).write_text(template.format(body=body, auth=auth(port)))
            return scripts[key]

        url = "http://%s:%%d/v1/chat/completions" % HOST

        # warm-up (not recorded): imports, pools, first allocations
        for name in live:
            port = results["proxies"][name]["port"]
            run_wrk(url % port, lua("plain", port), 32, 1, 1, pin_load)
            run_wrk(url % port, lua("stream", port), 200, 1, 1, pin_load)

        for rnd in range(args.rounds):
            order = list(live) if rnd % 2 == 0 else list(reversed(list(live)))
            if rnd == 0:  # the upstream alone, as the ceiling (once)
                u = {}
                if "plain" not in skip:
                    u["plain"] = run_wrk(url % up_port, lua("plain", up_port), 32, args.duration, args.wrk_threads, pin_load)
                if "streams" not in skip:
                    u["streams"] = run_wrk(url % up_port, lua("stream", up_port), 200, args.duration, args.wrk_threads, pin_load)
                results["upstream"].append(u)
                log("round %d upstream alone: %s req/s, %s streams/s" % (
                    rnd + 1, u.get("plain", {}).get("rps"), _r(u.get("streams", {}).get("completed_per_s"))))
            for name in order:
                if not live[name].alive():
                    log("%s died (see log); skipping" % name)
                    continue
                port = results["proxies"][name]["port"]
                r = {}
                pids = pids_of(name)
                if "plain" not in skip:
                    used = cpu_seconds(pids())
                    r["plain"] = run_wrk(url % port, lua("plain", port), 32, args.duration, args.wrk_threads, pin_load)
                    per_request(r["plain"], cpu_seconds(pids()) - used, "requests")
                if "streams" not in skip:
                    used = cpu_seconds(pids())
                    r["streams"] = run_wrk(url % port, lua("stream", port), 200, args.duration, args.wrk_threads, pin_load)
                    per_request(r["streams"], cpu_seconds(pids()) - used, "completed")
                if "latency" not in skip:
                    r["latency"] = added_latency(port, up_port, args.latency_n, 30)
                    r["ttfc"] = added_ttfc(port, up_port, 20)
                if "half" not in skip and r.get("plain", {}).get("rps"):
                    r["half"] = half_load(url % port, port, url % up_port, up_port, r["plain"]["rps"],
                                          r.get("latency", {}).get("proxy_p50_ms") or 1.0, args.duration, pin_load,
                                          tmp)
                results["proxies"][name]["rounds"].append(r)
                for part in ("plain", "streams"):
                    if r.get(part, {}).get("errors") or r.get(part, {}).get("error"):
                        log("    %s %s errors: non-2xx %s, incomplete streams %s, socket %s %s" % (
                            name, part, r[part].get("non2xx"), r[part].get("bad_streams"),
                            r[part].get("socket_error_kinds"), r[part].get("error", "")))
                log("round %d %-9s plain %s req/s (err %s, p99 %s ms) | streams %s/s (err %s) | +p50 %s ms "
                    "+ttfc %s ms | half rate %s req/s +p99 %s ms" % (
                        rnd + 1, name, _r(r.get("plain", {}).get("rps")), r.get("plain", {}).get("errors"),
                        _r(r.get("plain", {}).get("p99_ms"), 2),
                        _r(r.get("streams", {}).get("completed_per_s")), r.get("streams", {}).get("errors"),
                        _r(r.get("latency", {}).get("added_p50_ms"), 3), _r(r.get("ttfc", {}).get("added_ttfc_p50_ms"), 3),
                        _r(r.get("half", {}).get("rps")), _r(r.get("half", {}).get("added_p99_ms"), 2)))

        if args.profile and "fwd" in live:
            served = sum((r.get("plain", {}).get("requests") or 0) + (r.get("streams", {}).get("completed") or 0)
                         + (args.latency_n if r.get("latency") else 0) for r in results["proxies"]["fwd"]["rounds"])
            stop_proxy("fwd")  # twistd writes the profile as it stops
            results["profile"] = profile_summary(args.profile, served)

        # Memory. Per proxy: idle RSS after the load rounds; the slow reader on that warm process; then a
        # fresh process for the held streams (a proxy that buffered 200 MB, or that keeps serving abandoned
        # requests, would otherwise skew the next figure); then that process is stopped.
        mem_names = [n for n in live] if not {"mem", "slow"} <= skip else []
        for rnd in range(args.mem_rounds):
            for name in mem_names:
                if name not in live and start_proxy(name):
                    continue
                if not live[name].alive():
                    log("%s died (see log); skipping" % name)
                    continue
                m = {}
                drained(name, results["proxies"][name]["port"])
                m["idle"] = {"rss_kb": rss_kb(pids_of(name)())}
                if "slow" not in skip:
                    m["slow"] = slow_reader(results["proxies"][name]["port"], pids_of(name), args.slow_seconds,
                                            200 * 1048576)
                if "mem" not in skip:
                    stop_proxy(name)
                    err = start_proxy(name)
                    if err:
                        m["hold"] = {"error": "restart failed: %s" % err}
                    else:
                        port = results["proxies"][name]["port"]
                        for _ in range(20):  # a little traffic first: pools, lazy imports
                            http_get_ok(port)
                        run_wrk(url % port, lua("stream", port), 50, 1, 1, pin_load)
                        drained(name, port)
                        m["hold"] = hold_streams(port, args.streams, pids_of(name))
                stop_proxy(name)
                results["proxies"][name]["mem_rounds"].append(m)
                h, s = m.get("hold", {}), m.get("slow", {})
                log("memory %-9s idle %s MB | fresh %s MB, %s/%s streams open (%s held), +%s MB, %s KB/held stream "
                    "| slow reader +%s MB (%s MB read)" % (
                        name, _r(m["idle"]["rss_kb"] / 1024, 1), _r(h.get("rss_before_kb", 0) / 1024, 1),
                        h.get("open"), h.get("requested"), h.get("held"), _r(h.get("growth_mb"), 1),
                        _r(h.get("kb_per_stream"), 1), _r(s.get("growth_mb"), 1), _r(s.get("received_mb"), 1)))

        if "realtime" not in skip and "fwd" in names:
            results["realtime"] = realtime_section(args, tmp, procs, pin_proxy, pin_load)

        # fold memory rounds into the per-proxy rounds for the table
        for name, st in results["proxies"].items():
            for i, m in enumerate(st.get("mem_rounds", [])):
                if i < len(st["rounds"]):
                    st["rounds"][i].update(m)
                else:
                    st["rounds"].append(dict(m))
            if name in live:
                st.setdefault("log_tail", []).append(live[name].tail(20))

        notes = [
            "%s, %d CPUs, Python %s; wrk -t%d (32 conns plain, 200 conns streams), %d s per run, %d round(s) "
            "alternating (medians shown); memory tests: %d round(s) after the load rounds." % (
                platform.node(), os.cpu_count(), platform.python_version(), args.wrk_threads, args.duration,
                args.rounds, args.mem_rounds),
            "Pinning: %s. Load average at start %s, at end %s (the machine is shared; compare columns "
            "within one run, not across runs)." % (results["machine"]["pinning"], results["machine"]["loadavg_start"],
                                                  " ".join(open("/proc/loadavg").read().split()[:3])),
            "Ratios are fwd divided by the other column; ↑ = higher is better, ↓ = lower is better. "
            "'added' = through the proxy minus direct to the upstream (alternating requests). "
            "Streams count only 200 responses ending in data: [DONE].",
        ]
        ups = results["upstream"][0] if results["upstream"] else {}
        for name, st in results["proxies"].items():
            for part, key, what in (("plain", "rps", "req/s"), ("streams", "completed_per_s", "streams/s")):
                mine, ceil = value_of(st.get("rounds", []), part, key), ups.get(part, {}).get(key)
                if mine and ceil and mine >= 0.7 * ceil:
                    notes.append("%s %s is within 30%% of the upstream alone (%.0f): it is bounded by the shared "
                                 "2 cores / the fake upstream, so read it as a lower bound." % (name, what, ceil))
        if "reference" in live or "reference" in results["proxies"]:
            notes.append("reference = openai-forward 0.8.1, 1 uvicorn worker (the call `aifd run` makes, bound to "
                         "127.0.0.1); it caps upstream connections at 500 (aiohttp TCPConnector(limit=500)), so "
                         "further streams wait inside it: its KB/stream counts every held client connection.")
        for name, st in results["proxies"].items():
            if st.get("failed"):
                notes.append("%s: failed to start (%s)." % (name, st["failed"]))
        table = render(results, names, notes)
        rt = results.get("realtime") or {}
        if rt.get("error"):
            table += "\n\nRealtime (f): %s" % rt["error"]
        elif rt:
            hold = rt.get("hold", {})
            table += ("\n\nRealtime over WebSocket (f), fwd to an echo upstream, %d frames one at a time: round trip "
                      "direct p50 %.3f / p99 %.3f ms, through fwd p50 %.3f / p99 %.3f ms, added per frame (both ways) "
                      "p50 %.3f / p99 %.3f ms; %d sessions held at once: %.1f KB per session." % (
                          rt["frames"], rt["direct_p50_ms"], rt["direct_p99_ms"], rt["proxied_p50_ms"],
                          rt["proxied_p99_ms"], rt["added_p50_ms"], rt["added_p99_ms"], hold.get("sessions", 0),
                          hold.get("kb_per_session", 0.0)))
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        print(table)
        if results.get("profile"):
            print("\nfwd under cProfile (%s requests and streams served; the profiler's own cost inflates every "
                  "figure, compare rows, not absolutes):" % results["profile"]["served"])
            print("  %10s %12s %12s  %s" % ("calls/req", "own µs/req", "total µs/req", "function"))
            for row in results["profile"]["top"]:
                print("  %10.2f %12.1f %12.1f  %s" % (row["calls"], row["own_us"], row["total_us"], row["function"]))
        print("\n(total %.0f s)" % results["elapsed_s"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=str)
            log("raw results: %s" % args.json)
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        for p in reversed(procs):
            p.stop()
        if args.keep_tmp:
            log("temp dir kept: %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def realtime_section(args, tmp, procs, pin_proxy, pin_load):
    """f: a fresh fwd in front of benchmarks/realtime.py's echo upstream; the figures of realtime.measure."""
    sys.path.insert(0, str(HERE))
    import realtime

    up_port, port = free_port(), free_port()
    upstream = Proc("realtime-upstream", [sys.executable, str(HERE / "realtime.py"), "upstream", "--port",
                                          str(up_port)], base_env(), tmp, os.path.join(tmp, "realtime-upstream.log"),
                    pin_load)
    procs.append(upstream)
    spec, err = fwd_command(args, port, up_port)
    if err:
        return {"error": err}
    cmd, env = spec
    proxy = Proc("fwd-realtime", cmd, env, tmp, os.path.join(tmp, "fwd-realtime.log"), pin_proxy)
    procs.append(proxy)
    deadline = time.monotonic() + args.start_timeout
    while not http_get_ok(port, "/healthz", timeout=1.0):
        if time.monotonic() > deadline or not proxy.alive():
            return {"error": "fwd did not start:\n" + proxy.tail()}
        time.sleep(0.2)
    try:
        found = realtime.measure(port, up_port, args.realtime_sessions, args.realtime_frames, serving_pids(proxy))
    except Exception as e:  # a failed measurement is reported, not fatal to the run
        found = {"error": "%s: %s" % (type(e).__name__, e)}
    finally:
        proxy.stop()
        upstream.stop()
    log("realtime: %s" % json.dumps({k: v for k, v in found.items() if k != "hold"}, default=str))
    if "hold" in found:
        log("realtime: %s" % json.dumps(found["hold"]))
    return found


def _r(v, nd=0):
    if not isinstance(v, (int, float)):
        return v
    return round(v, nd) if nd else int(round(v))


if __name__ == "__main__":
    sys.exit(main())
