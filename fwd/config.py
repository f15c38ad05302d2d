"""Configuration: the options, where they come from, and their validation.  Tests: tests/test_config.py

Precedence: command line, then environment, then `.env` in the working directory, then the `--config` TOML
file, then defaults.  Everything here is pure: no reactor, no sockets.  A bad value raises ConfigError whose
message is the one line printed at startup; it never contains a secret.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

import attrs

KINDS = ("openai", "azure", "general")


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
    Setting("workers", ("WORKERS",), "1", help="processes serving the same port(s)"),
    Setting("metrics-port", ("METRICS_PORT",), "", help="endpoint of a Prometheus /metrics listener, e.g. tcp:9100"),
    Setting("grace-period", ("GRACE_PERIOD",), "30",
            help="seconds running requests may take to finish after SIGTERM"),
    Setting("body-timeout", ("BODY_TIMEOUT",), "30",
            help="seconds a request body may pause before the request is answered 408 and closed"),
    Setting("tls-ciphers", ("TLS_CIPHERS",), "ECDHE+AESGCM:ECDHE+CHACHA20",
            help="OpenSSL cipher list for TLS 1.2 on ssl: ports (TLS 1.2 and later only; TLS 1.3 suites are fixed)"),
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


@attrs.frozen
class ForwardKey:
    """A key handed to clients in place of the upstream keys, with a display name and optional model list."""

    key: str = attrs.field(repr=False)
    name: str
    models: frozenset[str] | None = None

    def allows(self, model: str | None) -> bool:
        return self.models is None or model in self.models


@attrs.frozen
class Route:
    """A path prefix served by one upstream with its own key pool and forward keys."""

    prefix: str
    base_url: str
    kind: str = "openai"
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    forward_keys: tuple[ForwardKey, ...] = attrs.field(default=(), repr=False)
    allow_client_keys: bool = True

    @property
    def no_auth(self) -> bool:
        """Keys in the pool but no forward keys: anyone may use the pool."""
        return bool(self.api_keys) and not self.forward_keys

    @property
    def name(self) -> str:
        return self.prefix or "/"


@attrs.frozen
class Config:
    """The whole validated configuration of one daemon."""

    ports: tuple[str, ...] = ("tcp:8000",)
    routes: tuple[Route, ...] = ()
    proxy_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    ip_whitelist: tuple = ()
    ip_blacklist: tuple = ()
    trusted_proxies: tuple = ()
    timeout: float = 600.0
    idle_timeout: float = 300.0
    max_body_size: int = 100 * 1024 * 1024
    log_chat: bool = False
    log_dir: str = "./Log"
    hop_header_prefix: str = ""
    workers: int = 1
    metrics_port: str | None = None
    grace_period: float = 30.0
    body_timeout: float = 30.0
    tls_ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20"
    check_keys: bool = True
    config_file: str | None = None
    ignored: tuple[str, ...] = ()


def split_list(value: object) -> list[str]:
    """Split a space- or comma-separated setting (or take a list as it is)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part for part in re.split(r"[\s,]+", str(value)) if part]


def unnamed(key: str, index: int, taken: set[str]) -> str:
    """The name of a forward key given without one: its masked form (prefix and last four characters), which
    does not give the key away; a key too short to mask, or masking like an earlier one, is named by its
    place in the list instead."""
    name = mask(key)
    if name == "***" or name in taken:
        name = f"fk-#{index}"
    return name


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


def parse_one_forward_key(value: str, source: str, index: int) -> str:
    keys = parse_secrets(value, source, "fk-")
    if len(keys) != 1:
        raise ConfigError(f"{source}: forward key {index} must be exactly one fk- key")
    return keys[0]


def parse_forward_keys(value: object, source: str) -> tuple[ForwardKey, ...]:
    items = value if isinstance(value, (list, tuple)) else split_list(value)
    keys = []
    for index, item in enumerate(items, 1):
        if isinstance(item, str):
            key = parse_one_forward_key(item, source, index)
            keys.append(ForwardKey(key, unnamed(key, index, {k.name for k in keys})))
        elif isinstance(item, Mapping):
            unknown = set(item) - {"key", "name", "models"}
            if unknown or not isinstance(item.get("key"), str):
                raise ConfigError(f"{source}: forward key {index} must be a table with key, name, models")
            key = parse_one_forward_key(item["key"], source, index)
            models = item.get("models")
            if models is not None and (
                not isinstance(models, (list, tuple)) or not all(isinstance(m, str) for m in models)
            ):
                raise ConfigError(f"{source}: forward key {index} models must be a list of model names")
            name = str(item.get("name") or unnamed(key, index, {k.name for k in keys}))
            keys.append(ForwardKey(key, name, frozenset(models) if models is not None else None))
        else:
            raise ConfigError(f"{source}: forward key {index} must be a string or a table")
    seen = set()
    for key in keys:
        if key.key in seen:
            raise ConfigError(f"{source}: forward key {key.name} is listed twice")
        seen.add(key.key)
    return tuple(keys)


def make_route(
    *,
    prefix: object,
    base_url: object,
    kind: object,
    api_keys: object,
    forward_keys: object,
    allow_client_keys: bool,
    where: Mapping[str, str],
) -> Route:
    """Validate one route; `where` names each field's source for error messages."""
    if kind not in KINDS:
        raise ConfigError(f"{where['kind']}={kind!r} must be one of {', '.join(KINDS)}")
    route = Route(
        prefix=parse_prefix(prefix, where["prefix"]),
        base_url=parse_url(base_url, where["base_url"]),
        kind=kind,
        api_keys=parse_secrets(api_keys, where["api_keys"]),
        forward_keys=parse_forward_keys(forward_keys, where["forward_keys"]),
        allow_client_keys=allow_client_keys,
    )
    if route.forward_keys and not route.api_keys:
        raise ConfigError(
            f"{where['forward_keys']} is set but {where['api_keys']} is empty: forward keys need upstream keys"
        )
    return route


def routes_from_file(tables: object, file_name: str, allow_client_keys: bool) -> tuple[Route, ...]:
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError(f"{file_name}: 'route' must be an array of tables ([[route]])")
    if not tables:
        raise ConfigError(f"{file_name}: 'route' is empty; add at least one [[route]] table")
    routes = []
    for number, table in enumerate(tables, 1):
        here = f"[[route]] {number} in {file_name}"
        unknown = set(table) - {"prefix", "base_url", "kind", "api_keys", "forward_keys", "allow_client_keys"}
        if unknown:
            raise ConfigError(f"{here}: unknown field {sorted(unknown)[0]!r}")
        if "base_url" not in table:
            raise ConfigError(f"{here}: base_url is missing")
        allow = table.get("allow_client_keys", allow_client_keys)
        if not isinstance(allow, bool):
            raise ConfigError(f"{here}: allow_client_keys must be true or false")
        routes.append(
            make_route(
                prefix=table.get("prefix", ""),
                base_url=table["base_url"],
                kind=table.get("kind", "openai"),
                api_keys=table.get("api_keys", ()),
                forward_keys=table.get("forward_keys", ()),
                allow_client_keys=allow,
                where={f: f"{here}: {f}" for f in ("prefix", "base_url", "kind", "api_keys", "forward_keys")},
            )
        )
    prefixes = [r.prefix for r in routes]
    for prefix in prefixes:
        if prefixes.count(prefix) > 1:
            raise ConfigError(f"{file_name}: two routes have the prefix {prefix or '/'!r}")
    return tuple(routes)


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
    unknown = set(data) - set(SETTING_BY_KEY) - {"route"}
    if unknown:
        raise ConfigError(f"--config {path}: unknown setting {sorted(unknown)[0]!r}")
    return data


def build(raw: Mapping[str, Raw], file_data: Mapping[str, object] | None = None, file_name: str = "") -> Config:
    """Validate the gathered raw settings into a Config."""
    allow_client_keys = parse_bool(raw["allow_client_keys"])
    ignored = ()
    if file_data and "route" in file_data:
        routes = routes_from_file(file_data["route"], file_name, allow_client_keys)
        ignored = tuple(raw[k].source for k in SINGLE_ROUTE_KEYS if not raw[k].source.startswith("default"))
    else:
        routes = (
            make_route(
                prefix=raw["route_prefix"].value,
                base_url=raw["base_url"].value,
                kind="openai",
                api_keys=raw["api_key"].value,
                forward_keys=raw["forward_key"].value,
                allow_client_keys=allow_client_keys,
                where={
                    "prefix": raw["route_prefix"].source,
                    "base_url": raw["base_url"].source,
                    "kind": "kind",
                    "api_keys": raw["api_key"].source,
                    "forward_keys": raw["forward_key"].source,
                },
            ),
        )
    metrics = str(raw["metrics_port"].value or "").strip()
    return Config(
        ports=parse_ports(raw["port"]),
        routes=routes,
        proxy_keys=parse_secrets(raw["proxy_key"].value, raw["proxy_key"].source),
        ip_whitelist=parse_networks(raw["ip_whitelist"]),
        ip_blacklist=parse_networks(raw["ip_blacklist"]),
        trusted_proxies=parse_networks(raw["trusted_proxies"]),
        timeout=parse_seconds(raw["timeout"]),
        idle_timeout=parse_seconds(raw["idle_timeout"]),
        max_body_size=parse_size(raw["max_body_size"]),
        log_chat=parse_bool(raw["log_chat"]),
        log_dir=str(raw["log_dir"].value),
        hop_header_prefix=str(raw["hop_header_prefix"].value or "").strip().lower(),
        workers=parse_int(raw["workers"], 1),
        metrics_port=parse_port(metrics, raw["metrics_port"].source) if metrics else None,
        grace_period=parse_seconds(raw["grace_period"]),
        body_timeout=parse_seconds(raw["body_timeout"]),
        tls_ciphers=parse_ciphers(raw["tls_ciphers"]),
        check_keys=parse_bool(raw["check_keys"]),
        config_file=file_name or None,
        ignored=ignored,
    )


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


def from_sources(sources: Sources) -> Config:
    """The validated Config of what was read."""
    dotenv = read_dotenv(sources.dotenv) if sources.dotenv is not None else {}
    file_name = sources.config_file or ""
    file_data = parse_config_text(sources.config_text, file_name) if sources.config_text is not None else {}
    raw = gather(sources.cli, sources.environ, dotenv, file_data, file_name)
    return build(raw, file_data, file_name)


def load(
    cli: Mapping[str, object],
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | None = ".env",
    config_file: str | None = None,
) -> Config:
    """Read every source in precedence order and return the validated Config."""
    return from_sources(read_sources(cli, environ, dotenv_path, config_file))


def describe(config: Config) -> Iterable[str]:
    """Startup lines summarising the configuration, with no secrets."""
    for route in config.routes:
        auth = (
            f"{len(route.api_keys)} pool keys, {len(route.forward_keys)} forward keys"
            if route.api_keys
            else "client keys pass through"
        )
        yield f"route {route.name} -> {route.base_url} ({route.kind}; {auth})"
        if route.no_auth:
            yield (
                f"WARNING: route {route.name} has pool keys but no FORWARD_KEY: anyone who can reach this "
                "proxy uses your upstream keys (no-auth mode)"
            )
    for source in config.ignored:
        yield f"note: {source} is ignored because --config has [[route]] tables"
