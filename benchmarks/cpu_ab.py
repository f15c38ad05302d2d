#!/usr/bin/env python3
"""CPU per request of several daemons, loaded at the same time so that machine noise hits them alike.

    python benchmarks/cpu_ab.py now=. old=/path/to/older/checkout
    python benchmarks/cpu_ab.py "fk=.|--config fk.toml|fk-bench-0000" "limits=.|--config limits.toml|fk-bench-0000"

Each argument is NAME=TREE[|TWISTD ARGS[|API KEY]]: TREE is a checkout put first on PYTHONPATH (the twistd
next to this Python runs it), TWISTD ARGS are added after `openai-forward`, API KEY is the bearer token the
load sends (default the pool key of benchmarks/upstream.py's examples).  A TOML file given in the args may use
{upstream} for the fake upstream's URL.  Every daemon gets its own wrk at once, for --rounds rounds of
--seconds after one warm-up round, per load kind; the report is each daemon's median CPU microseconds per
request (from /proc) and the median of its per-round ratio to the first daemon: the ratio is the figure to
trust on a shared machine, where sequential runs (benchmarks/run.py) move by a fifth between rounds.
Everything runs on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POOL_KEY = "sk-bench-000000000000000000000000000000000000"
BODY = '{"model":"gpt-3.5-turbo",%s"messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
LUA = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""
CONNECTIONS = {"plain": 16, "stream": 100}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(port: int, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("daemons", nargs="+", metavar="NAME=TREE[|ARGS[|KEY]]")
    parser.add_argument("--kinds", default="plain,stream", help="plain, stream or both (default both)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        parser.error("wrk is required (apt-get install wrk)")
    twistd = Path(sys.executable).parent / "twistd"
    work = tempfile.mkdtemp(prefix="fwd-cpu-ab-")
    children = []
    try:
        up_port = free_port()
        upstream = subprocess.Popen([sys.executable, str(HERE / "upstream.py"), "--port", str(up_port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        children.append(upstream)
        if not wait_listening(up_port):
            raise SystemExit("the fake upstream did not start")
        daemons = {}
        for spec in args.daemons:
            name, _, rest = spec.partition("=")
            tree, _, more = rest.partition("|")
            extra, _, key = more.partition("|")
            port = free_port()
            folder = os.path.join(work, name)
            os.makedirs(folder)
            words = []
            for word in shlex.split(extra):
                if word.endswith(".toml") and os.path.exists(word):
                    text = Path(word).read_text().replace("{upstream}", f"http://127.0.0.1:{up_port}")
                    word = os.path.join(folder, os.path.basename(word))
                    Path(word).write_text(text)
                words.append(word)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
                   "PYTHONPATH": os.path.abspath(tree), "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}",
                   "CHECK_KEYS": "false"}
            process = subprocess.Popen(
                [str(twistd), "-n", "--pidfile=", "openai-forward", "--port", f"tcp:{port}:interface=127.0.0.1",
                 *words], env=env, cwd=folder, stdout=open(os.path.join(folder, "log"), "w"), stderr=subprocess.STDOUT)
            children.append(process)
            if not wait_listening(port):
                raise SystemExit(f"{name} did not start; see {folder}/log")
            scripts = {}
            for kind in ("plain", "stream"):
                scripts[kind] = os.path.join(folder, kind + ".lua")
                body = BODY % ('"stream":true,' if kind == "stream" else "")
                Path(scripts[kind]).write_text(LUA % (body, key or POOL_KEY))
            daemons[name] = (process, port, scripts)
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        cpu = {name: {kind: [] for kind in kinds} for name in daemons}
        for kind in kinds:
            for number in range(args.rounds + 1):
                before = {name: cpu_seconds(p.pid) for name, (p, _, _) in daemons.items()}
                loads = {name: subprocess.Popen(
                    ["wrk", "-t1", f"-c{CONNECTIONS[kind]}", f"-d{args.seconds}s", "-s", scripts[kind],
                     f"http://127.0.0.1:{port}/v1/chat/completions"], stdout=subprocess.PIPE, text=True)
                    for name, (_, port, scripts) in daemons.items()}
                outputs = {name: load.communicate()[0] for name, load in loads.items()}
                if number == 0:
                    continue  # warm-up
                for name, (process, _, _) in daemons.items():
                    served = int(re.search(r"(\d+) requests in", outputs[name]).group(1))
                    if "Non-2xx" in outputs[name]:
                        print(f"{name}: {kind} answers other than 2xx; check its log", file=sys.stderr)
                    cpu[name][kind].append((cpu_seconds(process.pid) - before[name]) / served * 1e6)
        first = next(iter(daemons))
        for name in daemons:
            parts = []
            for kind in kinds:
                ratios = [mine / theirs for mine, theirs in zip(cpu[name][kind], cpu[first][kind])]
                parts.append(f"{kind} {statistics.median(cpu[name][kind]):.0f} µs/request "
                             f"(x{statistics.median(ratios):.3f} of {first})")
            print(f"{name:12s} " + "; ".join(parts))
        return 0
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
