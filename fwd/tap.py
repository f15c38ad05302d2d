"""The twistd plugin: `twistd -n openai-forward [options]` builds the daemon's service.  Tests: tests/test_daemon.py, tests/test_cli.py"""

from __future__ import annotations

import sys

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from fwd import config as configuration
from fwd import settings

log = Logger(namespace="fwd.startup")


class Options(usage.Options):
    """Command-line options; each also reads its environment variable (see README)."""

    synopsis = "[options]"
    longdesc = (
        "Forward OpenAI API traffic to an OpenAI-compatible upstream, streaming responses as they arrive. "
        "Every option also reads the environment variable named in its help, and `.env` in the working directory."
    )
    optParameters = [
        [s.name, None, None, f"{s.help} (env {' / '.join(s.envs)}, default {s.default or 'none'})"]
        for s in settings.SETTINGS
        if s.name not in ("port", "log-chat", "cache")
    ] + [["config", "c", None, "TOML file with [[route]] tables and any of the settings above"]]
    optFlags = [
        ["log-chat", None, "Keep chat transcripts in LOG_DIR/chat.jsonl (env LOG_CHAT)"],
        ["cache", None, "Answer repeated identical requests from the response cache (env CACHE; a [[route]]'s "
                        "cache overrides it)"],
    ]

    def __init__(self):
        super().__init__()
        self["port"] = []

    def opt_port(self, endpoint):
        """Endpoint to listen on, repeatable: tcp:8000, ssl:8443:privateKey=k.pem:certKey=c.pem, unix:/path, or a
        bare number for tcp (env PORT / OXY_PORT, default tcp:8000)"""
        self["port"].append(endpoint)

    def opt_listen(self, endpoint):
        """The same as --port"""
        self.opt_port(endpoint)

    def postOptions(self):
        cli = {key.replace("-", "_"): value for key, value in self.items() if key != "config"}
        cli["log_chat"] = True if self["log-chat"] else None
        cli["cache"] = True if self["cache"] else None
        self.cli = cli
        self.load = lambda: configuration.load(cli, config_file=self["config"])
        try:
            self.sources = settings.read_sources(cli, config_file=self["config"])
            self.config = configuration.from_sources(self.sources)
        except configuration.ConfigError as e:
            fail(e)


def fail(problem: object) -> None:
    """Stop startup with one line that says what to fix."""
    sys.stderr.write(f"openai-forward: {problem}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def makeService(options) -> service.MultiService:
    """Build the daemon (see fwd.daemon), or the supervisor of its workers (see fwd.workers)."""
    from fwd.daemon import build_service
    from fwd.workers import build_supervisor

    try:
        if options.config.workers > 1:
            return build_supervisor(options.sources, options.config)
        return build_service(options.config, load=options.load)
    except configuration.ConfigError as e:
        fail(e)
