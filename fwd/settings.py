"""The daemon's settings: their names, where each is read from (command line, environment, `.env`, the
--config file, defaults), and how each raw value is checked.  Pure.  Tests: tests/test_config.py

A bad value raises ConfigError, whose message is the one line printed at startup; it never contains a secret.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import attrs


class ConfigError(Exception):
    """A configuration problem, described in one line that says what to fix."""


@attrs.frozen
class Setting:
    """One option: its command-line name, the environment names it answers to, its default and its help."""

    name: str
    envs: tuple[str, ...]
    default: object = None
    help: str = ""

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


SETTINGS = (
    Setting("port", ("PORT", "OXY_PORT"), "tcp:8000",
            help="endpoint to listen on, repeatable: tcp:8000, ssl:8443:privateKey=k.pem:certKey=c.pem, unix:/path; a bare number means tcp"),
    Setting("base-url", ("OPENAI_BASE_URL", "OXY_TARGET"), "https://api.openai.com",
            help="the upstream: OpenAI, Azure OpenAI or any OpenAI-compatible server"),
    Setting("api-key", ("OPENAI_API_KEY",), "",
            help="upstream key pool, space or comma separated; rotated, cooled down on 429, disabled on 401/403"),
    Setting("forward-key", ("FORWARD_KEY",), "",
            help="fk- keys handed to clients in place of the pool keys, space or comma separated"),
    Setting("proxy-key", ("PROXY_KEY",), "",
            help="access keys clients append to their key as <key>:<proxy key>, space or comma separated"),
    Setting("route-prefix", ("ROUTE_PREFIX",), "", help="serve under this path prefix, e.g. /openai"),
    Setting("ip-whitelist", ("IP_WHITELIST",), "", help="only these addresses or CIDRs may connect"),
    Setting("ip-blacklist", ("IP_BLACKLIST",), "", help="these addresses or CIDRs may not connect"),
    Setting("trusted-proxies", ("TRUSTED_PROXIES",), "",
            help="addresses or CIDRs of reverse proxies whose X-Forwarded-For is believed"),
    Setting("allow-client-keys", ("ALLOW_CLIENT_KEYS",), "true",
            help="let a client's own upstream key pass through unchanged (false: forward keys only)"),
    Setting("timeout", ("TIMEOUT",), "600", help="seconds to connect and get the upstream's response headers (504)"),
    Setting("idle-timeout", ("IDLE_TIMEOUT",), "300",
            help="seconds an answer may stall mid-body (the upstream sending nothing, or the client reading nothing) before the client connection is aborted"),
    Setting("max-body-size", ("MAX_BODY_SIZE",), "100M", help="largest request body, bytes or with K/M/G (413)"),
    Setting("log-chat", ("LOG_CHAT",), "false", help="keep chat transcripts in LOG_DIR/chat.jsonl"),
    Setting("log-dir", ("LOG_DIR",), "./Log", help="directory of the transcripts"),
    Setting("hop-header-prefix", ("HOP_HEADER_PREFIX", "OXY_HOP_HEADER_PREFIX"), "",
            help="drop request headers whose names start with this prefix, e.g. X-SCF"),
    Setting("workers", ("WORKERS",), "1", help="processes serving the same port(s); auto: one per available core"),
    Setting("metrics-port", ("METRICS_PORT",), "", help="endpoint of a Prometheus /metrics listener, e.g. tcp:9100"),
    Setting("grace-period", ("GRACE_PERIOD",), "30",
            help="seconds running requests may take to finish after SIGTERM"),
    Setting("body-timeout", ("BODY_TIMEOUT",), "30",
            help="seconds a request body may pause before the request is answered 408 and closed"),
    Setting("tls-ciphers", ("TLS_CIPHERS",), "ECDHE+AESGCM:ECDHE+CHACHA20",
            help="OpenSSL cipher list for TLS 1.2 on ssl: ports (TLS 1.2 and later only; TLS 1.3 suites are fixed)"),
    Setting("data-dir", ("DATA_DIR",), "./Data",
            help="directory of the usage and budget store (SQLite), created when usage is counted"),
    Setting("usage", ("USAGE",), "auto",
            help="count token usage by caller, model and day: auto (when a limit or budget is configured), true, false"),
    Setting("stream-usage", ("STREAM_USAGE",), "true",
            help="ask the upstream for a stream's usage when the client did not, and remove it from what the "
                 "client receives (a route's stream_usage overrides it)"),
    Setting("cache", ("CACHE",), "false",
            help="answer repeated identical requests from the response cache (a [[route]]'s cache overrides it; "
                 "a request can always ask with x-fwd-cache or the body flag caching)"),
    Setting("cache-ttl", ("CACHE_TTL",), "3600", help="seconds a cached answer is served (a [[route]]'s cache_ttl overrides it)"),
    Setting("cache-max-size", ("CACHE_MAX_SIZE",), "256M",
            help="bytes the embedded response cache holds, with K/M/G; the least recently used go first"),
    Setting("redis-url", ("REDIS_URL",), "",
            help="share key states, limits, budgets and usage with other instances through this Redis, "
                 "e.g. redis://:password@10.0.0.5:6379/0 (rediss:// for TLS)"),
    Setting("redis-timeout", ("REDIS_TIMEOUT",), "0.1",
            help="seconds any Redis call may take before the daemon stops waiting for it"),
    Setting("redis-failure", ("REDIS_FAILURE",), "open",
            help="while Redis cannot be reached: open (limits held by each instance alone) or closed (limited "
                 "requests get 503)"),
    Setting("redis-secret", ("REDIS_SECRET",), "",
            help="key of the keyed hash that names pool keys in Redis (default: derived from the pool keys)"),
    Setting("check-keys", ("CHECK_KEYS",), "true",
            help="at startup and on SIGHUP, ask each pool key's upstream for /v1/models and disable the keys it "
                 "refuses (not for kind = general routes)"),
)
SETTING_BY_KEY = {s.key: s for s in SETTINGS}
SINGLE_ROUTE_KEYS = ("base_url", "api_key", "forward_key", "route_prefix")


@attrs.frozen
class Raw:
    """A setting's raw value and the name the user gave it, for error messages."""

    value: object
    source: str


def split_list(value: object) -> list[str]:
    """Split a space- or comma-separated setting (or take a list as it is)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part for part in re.split(r"[\s,]+", str(value)) if part]


def mask(secret: str) -> str:
    """Show a key the way dashboards do: its prefix and last four characters.

    Only when at least 8 characters stay hidden: the tail of a short key would give most of it away.
    """
    prefix = secret[:3] if secret[:3] in ("sk-", "fk-") else ""
    if len(secret) - len(prefix) - 4 < 8:
        return "***"
    return f"{prefix}…{secret[-4:]}"


def read_dotenv(text: str) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, `#` comments, optional `export` and quotes."""
    result = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name = name.strip()
        if name.startswith("export "):
            name = name[len("export ") :].strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        result[name] = value
    return result


def gather(
    cli: Mapping[str, object],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str],
    file_settings: Mapping[str, object],
    file_name: str = "the config file",
) -> dict[str, Raw]:
    """Pick each setting's raw value from the first source that has it."""
    raw = {}
    for setting in SETTINGS:
        key = setting.key
        value = cli.get(key)
        if value not in (None, [], ()):
            raw[key] = Raw(value, "--" + setting.name)
            continue
        for source, label in ((environ, "{}"), (dotenv, "{} in .env")):
            found = next((env for env in setting.envs if source.get(env, "") != ""), None)
            if found is not None:
                raw[key] = Raw(source[found], label.format(found))
                break
        else:
            if key in file_settings:
                raw[key] = Raw(file_settings[key], f"{key} in {file_name}")
            else:
                raw[key] = Raw(setting.default, "default " + setting.name)
    return raw


_DIGITS = re.compile(r"[0-9]+")


def parse_port(value: str, source: str) -> str:
    """A strports endpoint description; a bare number means TCP on all interfaces."""
    value = value.strip()
    if _DIGITS.fullmatch(value):
        value = "tcp:" + value
    kind, _, rest = value.partition(":")
    if kind in ("tcp", "ssl", "tcp6", "ssl6"):
        port = rest.split(":", 1)[0]
        if not _DIGITS.fullmatch(port) or int(port) > 65535:
            raise ConfigError(f"{source}: {value!r} has no valid port number; use e.g. tcp:8000 or 8000")
    elif kind == "unix":
        if not rest:
            raise ConfigError(f"{source}: {value!r} needs a socket path, e.g. unix:/run/fwd.sock")
    elif not rest:
        raise ConfigError(f"{source}: {value!r} is not an endpoint; use e.g. tcp:8000 or ssl:8443:privateKey=…")
    return value


def parse_ports(raw: Raw) -> tuple[str, ...]:
    values = raw.value if isinstance(raw.value, (list, tuple)) else split_list(raw.value)
    ports = tuple(parse_port(str(v), raw.source) for v in values)
    if not ports:
        raise ConfigError(f"{raw.source}: give at least one endpoint, e.g. tcp:8000")
    return ports


_BAD_URL_CHAR = re.compile(r"[\s\x00-\x1f\x7f]")


def parse_url(value: object, source: str) -> str:
    text = str(value).strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or _BAD_URL_CHAR.search(text):
        raise ConfigError(f"{source}={text!r} is not an http(s) URL; use e.g. https://api.openai.com")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{source}={text!r} has an invalid port") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"{source}={text!r} must not carry a query or fragment")
    if "@" in parts.netloc:
        # Never echo it: the user info is a credential.
        raise ConfigError(
            f"{source} has a user name or password in it: put the upstream's key in the key pool instead"
        )
    return text.rstrip("/")


def parse_prefix(value: object, source: str) -> str:
    text = str(value or "").strip()
    if not text or text == "/":
        return ""
    if not text.startswith("/"):
        text = "/" + text
    text = text.rstrip("/")
    if any(seg in (".", "..") for seg in text.split("/")) or "?" in text or "%" in text:
        raise ConfigError(f"{source}={text!r} must be a plain path such as /openai")
    return text


_CIPHERS = re.compile(r"[A-Za-z0-9+:!@=_-]+")


def parse_ciphers(raw: Raw) -> str:
    text = str(raw.value or "").strip()
    if not _CIPHERS.fullmatch(text):
        raise ConfigError(f"{raw.source}={text!r} is not an OpenSSL cipher list, e.g. ECDHE+AESGCM:ECDHE+CHACHA20")
    return text


@attrs.frozen
class RedisTarget:
    """Where the shared state lives: a Redis server, and how to reach it."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    tls: bool = False

    def __str__(self) -> str:
        """The URL without its password, for logs and /healthz."""
        auth = "" if self.password is None and self.username is None else f"{self.username or ''}:***@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{self.port}/{self.db}"


def parse_redis_url(raw: Raw) -> RedisTarget | None:
    """REDIS_URL: redis://[[user]:password@]host[:port][/db], or rediss:// for TLS; empty for none."""
    text = str(raw.value or "").strip()
    if not text:
        return None
    shown = "a URL like redis://:password@10.0.0.5:6379/0"
    try:
        parts = urlsplit(text)
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(f"{raw.source} is not {shown}") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{raw.source} is not {shown}")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ConfigError(f"{raw.source}: the database after the host must be a number, e.g. /0")
    return RedisTarget(
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme == "rediss",
    )


def parse_choice(raw: Raw, choices: tuple[str, ...]) -> str:
    text = str(raw.value or "").strip().lower()
    if text not in choices:
        raise ConfigError(f"{raw.source}={raw.value!r} must be one of {', '.join(choices)}")
    return text


def parse_seconds(raw: Raw) -> float:
    try:
        seconds = float(raw.value)
    except (TypeError, ValueError):
        raise ConfigError(f"{raw.source}={raw.value!r} is not a number of seconds, e.g. 30") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{raw.source}={raw.value!r} must be a positive number of seconds")
    return seconds


def parse_size(raw: Raw) -> int:
    text = str(raw.value).strip().upper().removesuffix("B").removesuffix("I")
    factor = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    if factor != 1:
        text = text[:-1]
    try:
        size = int(float(text) * factor)
    except (ValueError, OverflowError):
        raise ConfigError(f"{raw.source}={raw.value!r} is not a size in bytes, e.g. 10485760 or 10M") from None
    if size <= 0:
        raise ConfigError(f"{raw.source}={raw.value!r} must be a positive size")
    return size


def parse_bool(raw: Raw) -> bool:
    if isinstance(raw.value, bool):
        return raw.value
    text = str(raw.value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{raw.source}={raw.value!r} is not true or false")


def parse_int(raw: Raw, minimum: int) -> int:
    try:
        number = int(str(raw.value))
    except ValueError:
        raise ConfigError(f"{raw.source}={raw.value!r} is not a whole number") from None
    if number < minimum:
        raise ConfigError(f"{raw.source}={raw.value!r} must be at least {minimum}")
    return number


def parse_workers(raw: Raw, cores=None) -> int:
    """WORKERS: a whole number, or "auto": one per core this process may run on (os.sched_getaffinity)."""
    if str(raw.value).strip().lower() == "auto":
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores)
    try:
        return parse_int(raw, 1)
    except ConfigError:
        raise ConfigError(f"{raw.source}={raw.value!r} is not a whole number of workers, nor auto") from None


def parse_networks(raw: Raw) -> tuple:
    networks = []
    for item in split_list(raw.value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{raw.source}: {item!r} is not an IP address or CIDR such as 10.0.0.0/8") from None
    return tuple(networks)


def parse_secrets(value: object, source: str, prefix: str | None = None) -> tuple[str, ...]:
    keys = tuple(split_list(value))
    for index, key in enumerate(keys, 1):
        if ":" in key and prefix is None:
            raise ConfigError(f"{source}: key {index} contains ':'; keys may not contain it")
        if prefix and not key.startswith(prefix):
            raise ConfigError(f"{source}: key {index} must start with {prefix!r}")
    return keys


def read_config_file(path: str) -> str:
    """The text of a --config file; a problem is one ConfigError line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text; save it as UTF-8") from None


def parse_config_text(text: str, path: str) -> dict:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    unknown = set(data) - set(SETTING_BY_KEY) - {"route", "prices"}
    if unknown:
        raise ConfigError(f"--config {path}: unknown setting {sorted(unknown)[0]!r}")
    return data


@attrs.frozen
class Sources:
    """Everything a configuration is read from, read once: what the supervisor of --workers hands its workers,
    so a worker started after a refused reload serves the last good configuration, not a broken file."""

    cli: dict
    environ: dict
    dotenv: str | None = attrs.field(default=None, repr=False)
    dotenv_path: str | None = None
    config_text: str | None = attrs.field(default=None, repr=False)
    config_file: str | None = None

    def to_json(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Sources:
        return cls(**data)


def setting_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables settings read, and nothing else."""
    names = {env for setting in SETTINGS for env in setting.envs}
    return {name: environ[name] for name in names if name in environ}


def read_sources(
    cli: Mapping[str, object],
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | None = ".env",
    config_file: str | None = None,
) -> Sources:
    """Read the environment, `.env` and the --config file now."""
    dotenv = None
    if dotenv_path and os.path.isfile(dotenv_path):
        try:
            with open(dotenv_path, encoding="utf-8") as f:
                dotenv = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{dotenv_path}: cannot read it ({e})") from None
    return Sources(
        cli=dict(cli),
        environ=setting_environ(os.environ if environ is None else environ),
        dotenv=dotenv,
        dotenv_path=dotenv_path,
        config_text=read_config_file(config_file) if config_file else None,
        config_file=config_file,
    )
