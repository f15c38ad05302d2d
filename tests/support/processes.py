"""Real processes for end-to-end tests: the fake upstream (`python -m tests.support.upstream`) and the daemon
(`twistd -n openai-forward …`), each on loopback, each a context manager that stops what it started."""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

ROOT = str(Path(__file__).resolve().parents[2])


def with_checkout_on_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with this checkout first on PYTHONPATH, so children run the code under test."""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


class FakeUpstreamProcess:
    """Runs `python -m tests.support.upstream` on loopback in a child process; a context manager."""

    def __init__(
        self,
        *,
        key_status: Mapping[str, tuple] | None = None,
        expected_keys: Iterable[str] | None = None,
        timeout: float = 10.0,
        delay: float = 0.0,
    ) -> None:
        self.arguments = ["--port", "tcp:0:interface=127.0.0.1"]
        if delay:
            self.arguments += ["--delay", f"{delay:g}"]
        for key, (status, retry_after) in (key_status or {}).items():
            suffix = "" if retry_after is None else f":{retry_after:g}"
            self.arguments += ["--key-status", f"{key}={status}{suffix}"]
        for key in expected_keys or ():
            self.arguments += ["--expected-key", key]
        self.timeout = timeout
        self.port: int | None = None
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __enter__(self) -> FakeUpstreamProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> FakeUpstreamProcess:
        """Start the child and wait for its port."""
        env = with_checkout_on_path(dict(os.environ))
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.upstream", *self.arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        try:
            line = self._first_line()
            if not line.startswith("listening on "):
                raise RuntimeError(f"unexpected first line from fake upstream: {line!r}")
            self.port = int(line.rsplit(" ", 1)[1])
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _first_line(self) -> str:
        assert self._process is not None and self._process.stdout is not None
        descriptor = self._process.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        output = b""
        with selectors.DefaultSelector() as selector:
            selector.register(descriptor, selectors.EVENT_READ)
            while b"\n" not in output:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise RuntimeError(f"fake upstream did not start in {self.timeout}s: {self._errors()}")
                data = os.read(descriptor, 4096)
                if not data:
                    raise RuntimeError(f"fake upstream exited: {self._errors()}")
                output += data
        return output.split(b"\n", 1)[0].decode("utf-8", "replace")

    def _errors(self) -> str:
        if self._process is not None:
            self._process.poll()
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")[-2000:]

    def stop(self) -> None:
        """Terminate the child, killing it if it does not exit in time."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(self.timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(self.timeout)
        if process.stdout is not None:
            process.stdout.close()
        self._stderr.close()

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        with self._opener.open(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def received(self) -> list[dict[str, Any]]:
        """The recorded requests, as Received.to_json dicts."""
        return self._call("GET", "/__fake/received")

    def disconnects(self) -> int:
        """How many requests the clients dropped before their answer ended."""
        return self._call("GET", "/__fake/disconnects")["disconnects"]

    def reset(self) -> None:
        """Forget recorded requests and disconnects."""
        self._call("POST", "/__fake/reset", {})

    def set_keys(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change the key table as FakeUpstream.set_keys does; returns the new table."""
        return self._call("POST", "/__fake/keys", dict(changes))


def twistd_command() -> list[str]:
    """The `twistd` installed beside this Python, as a user runs it."""
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class DaemonProcess:
    """Runs the real daemon, `twistd -n openai-forward ...`, on loopback; a context manager.

    The port is read from twistd's log ("... starting on PORT"), so `--port tcp:0:interface=127.0.0.1` works.
    The child runs in `cwd` (a fresh temp dir by default) with exactly `env` on top of a minimal environment,
    so a developer's own OPENAI_API_KEY or .env never leaks into a test.
    """

    def __init__(
        self,
        arguments: Iterable[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        twistd: Iterable[str] = ("-n", "--pidfile="),
        timeout: float = 20.0,
    ) -> None:
        self.arguments = list(arguments)
        if not any(a in ("--port", "--listen") or a.startswith(("--port=", "--listen=")) for a in self.arguments):
            self.arguments = ["--port", "tcp:0:interface=127.0.0.1", *self.arguments]
        self.env = dict(env or {})
        self.cwd = cwd
        self.twistd = list(twistd)
        self.timeout = timeout
        self.ports: list[int] = []
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._output = b""
        self._owned_dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> DaemonProcess:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @staticmethod
    def base_env(extra: Mapping[str, str]) -> dict[str, str]:
        """A minimal environment: PATH, HOME, the repo on PYTHONPATH, and `extra`."""
        env = with_checkout_on_path({k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ})
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def start(self, expect_ports: int = 1) -> DaemonProcess:
        """Start twistd and wait until it listens on `expect_ports` ports."""
        if self.cwd is None:
            self._owned_dir = tempfile.TemporaryDirectory(prefix="fwd-daemon-")
            self.cwd = self._owned_dir.name
        self.watch(
            subprocess.Popen(
                [*twistd_command(), *self.twistd, "openai-forward", *self.arguments],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.base_env(self.env),
                cwd=self.cwd,
                start_new_session=True,  # its own process group, like a daemon started from a shell
            )
        )
        deadline = time.monotonic() + self.timeout
        found = re.compile(rb"starting on (\d+)")
        while len(self.ports) < expect_ports:
            if not self._read(deadline - time.monotonic()):
                self.stop()
                raise RuntimeError(f"openai-forward did not start:\n{self.output}")
            self.ports = [int(p) for p in found.findall(self._output)]
        self.url = f"http://127.0.0.1:{self.ports[0]}"
        return self

    def watch(self, process: subprocess.Popen) -> DaemonProcess:
        """Follow a daemon process started some other way (its stdout a pipe, stderr joined to it)."""
        self.process = process
        self._arrived = threading.Condition()
        self._ended = False
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        return self

    def _drain(self) -> None:
        """Read the daemon's output as it comes, so a chatty daemon never blocks on a full pipe."""
        assert self.process is not None and self.process.stdout is not None
        descriptor = self.process.stdout.fileno()
        while True:
            try:
                data = os.read(descriptor, 65536)
            except OSError:
                data = b""
            with self._arrived:
                if data:
                    self._output += data
                else:
                    self._ended = True
                self._arrived.notify_all()
            if not data:
                return

    def _read(self, wait: float) -> bool:
        """Wait up to `wait` seconds for more output; False once the output ended or nothing came."""
        with self._arrived:
            before = len(self._output)
            if wait > 0:
                self._arrived.wait_for(lambda: len(self._output) > before or self._ended, wait)
            return len(self._output) > before

    @property
    def output(self) -> str:
        """Everything the daemon printed so far (its log, with -n)."""
        self._read(0.05)
        with self._arrived:
            return self._output.decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        """Wait until the log contains `text`; return the whole log."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if not self._read(deadline - time.monotonic()):
                break
        return self.output

    def stop(self, sig: int = 15) -> int | None:
        """Signal the daemon (SIGTERM by default), wait for it, and return its exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(self.timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(self.timeout)
        self._reader.join(self.timeout)
        if process.stdout is not None:
            process.stdout.close()
        self.process = None
        if self._owned_dir is not None:
            self._owned_dir.cleanup()
            self._owned_dir = None
        return process.returncode




def rss_kib(pid: int) -> int:
    """The resident memory of a process, in KiB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
