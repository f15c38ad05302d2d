#!/usr/bin/env python3
"""The Realtime (WebSocket) part of the side-by-side benchmark: added latency per frame and memory per session.

    python benchmarks/realtime.py upstream --port N     a Realtime echo upstream on 127.0.0.1 (asyncio +
                                                        websockets): `session.created` on open, then every frame
                                                        echoed as it came
    python benchmarks/realtime.py measure --proxy P --upstream U [--sessions 200] [--frames 2000] [--pid PID...]

`measure` sends --frames small events one at a time on one session (the next after the echo of the last) straight
to the upstream, then through the proxy, and reports each round trip's p50/p99 and the difference: the latency the
proxy adds to a frame, both ways.  Then it holds --sessions sessions open through the proxy at once and reports
the proxy's RSS growth per session (from /proc of the --pid processes).  benchmarks/run.py runs it for the fwd
column; it can also run alone against any proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

EVENT = json.dumps({"type": "conversation.item.create", "event_id": "evt_bench", "item": {
    "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello in one short sentence."}]}})
KEY = "sk-bench-000000000000000000000000000000000000"


async def serve(port: int) -> None:
    from websockets.asyncio.server import serve as ws_serve

    async def session(ws):
        await ws.send(json.dumps({"type": "session.created", "session": {"id": "sess_bench", "model": "gpt-realtime"}}))
        async for message in ws:
            await ws.send(message)

    def choose(connection, offered):
        return "realtime" if "realtime" in offered else None

    async with ws_serve(session, "127.0.0.1", port, compression=None, max_size=None, select_subprotocol=choose):
        print(f"listening on {port}", flush=True)
        await asyncio.Future()


def rss_kb(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def pct(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def round_trips(url: str, frames: int, headers: dict) -> list[float]:
    from websockets.sync.client import connect

    with connect(url, additional_headers=headers, subprotocols=["realtime"], proxy=None, compression=None,
                 max_size=None) as ws:
        ws.recv(timeout=10)  # session.created
        for _ in range(50):  # warm
            ws.send(EVENT)
            ws.recv(timeout=10)
        times = []
        for _ in range(frames):
            start = time.perf_counter()
            ws.send(EVENT)
            ws.recv(timeout=10)
            times.append((time.perf_counter() - start) * 1000)
    return times


def hold(url: str, sessions: int, headers: dict, pids) -> dict:
    from websockets.sync.client import connect

    before = rss_kb(pids)
    opened = []
    try:
        for _ in range(sessions):
            ws = connect(url, additional_headers=headers, subprotocols=["realtime"], proxy=None, compression=None,
                         ping_interval=None)
            ws.recv(timeout=10)
            opened.append(ws)
        for ws in opened:  # every session relays a frame while all are open
            ws.send(EVENT)
        for ws in opened:
            ws.recv(timeout=10)
        time.sleep(0.5)
        after = rss_kb(pids)
    finally:
        for ws in opened:
            ws.close()
    return {"sessions": len(opened), "rss_before_kb": before, "rss_after_kb": after,
            "kb_per_session": (after - before) / max(1, len(opened))}


def measure(proxy_port: int, upstream_port: int, sessions: int, frames: int, pids, key: str = KEY) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    direct = round_trips(f"ws://127.0.0.1:{upstream_port}/v1/realtime?model=gpt-realtime", frames, headers)
    proxied = round_trips(f"ws://127.0.0.1:{proxy_port}/v1/realtime?model=gpt-realtime", frames, headers)
    found = {
        "frames": frames,
        "direct_p50_ms": pct(direct, 50), "direct_p99_ms": pct(direct, 99),
        "proxied_p50_ms": pct(proxied, 50), "proxied_p99_ms": pct(proxied, 99),
        "added_p50_ms": pct(proxied, 50) - pct(direct, 50), "added_p99_ms": pct(proxied, 99) - pct(direct, 99),
        "added_mean_ms": statistics.fmean(proxied) - statistics.fmean(direct),
    }
    if sessions and pids:
        found["hold"] = hold(f"ws://127.0.0.1:{proxy_port}/v1/realtime?model=gpt-realtime", sessions, headers, pids)
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    me = sub.add_parser("measure")
    me.add_argument("--proxy", type=int, required=True)
    me.add_argument("--upstream", type=int, required=True)
    me.add_argument("--sessions", type=int, default=200)
    me.add_argument("--frames", type=int, default=2000)
    me.add_argument("--pid", type=int, action="append", default=[])
    me.add_argument("--key", default=KEY)
    args = parser.parse_args(argv)
    if args.command == "upstream":
        asyncio.run(serve(args.port))
        return
    json.dump(measure(args.proxy, args.upstream, args.sessions, args.frames, args.pid, args.key), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
