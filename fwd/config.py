"""Configuration: the routes, their keys and limits, and the whole validated Config built from the settings
(fwd.settings).  Pure.  Tests: tests/test_config.py

Precedence: command line, then environment, then `.env` in the working directory, then the `--config` TOML
file, then defaults.  A bad value raises ConfigError whose message is the one line printed at startup; it
never contains a secret.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from fwd.limits import BudgetRule, Price, Rate, parse_budget, parse_rate
from fwd.settings import (
    SINGLE_ROUTE_KEYS,
    ConfigError,
    Raw,
    RedisTarget,
    Sources,
    gather,
    mask,
    parse_bool,
    parse_choice,
    parse_ciphers,
    parse_config_text,
    parse_networks,
    parse_port,
    parse_ports,
    parse_prefix,
    parse_redis_url,
    parse_seconds,
    parse_secrets,
    parse_size,
    parse_url,
    parse_workers,
    read_dotenv,
    read_sources,
    split_list,
)

KINDS = ("openai", "azure", "general")
LIMIT_FIELDS = ("rpm", "tpm", "max_parallel")
DEFAULT_MAX_TOKENS = 4096


@attrs.frozen
class Limits:
    """The limits of a forward key (or of everything a route serves): requests and tokens per period, requests
    at once, and a forward key's token or cost budget."""

    rpm: Rate | None = None
    tpm: Rate | None = None
    max_parallel: int | None = None
    budget: BudgetRule | None = None

    def __bool__(self) -> bool:
        return any(value is not None for value in (self.rpm, self.tpm, self.max_parallel, self.budget))


NO_LIMITS = Limits()


@attrs.frozen
class ForwardKey:
    """A key handed to clients in place of the upstream keys, with a display name and optional model list."""

    key: str = attrs.field(repr=False)
    name: str
    models: frozenset[str] | None = None
    limits: Limits = NO_LIMITS

    def allows(self, model: str | None) -> bool:
        return self.models is None or model in self.models


@attrs.frozen
class Upstream:
    """One server behind a route: where it is, how it speaks, its own key pool, its share of the traffic, the
    models it serves (None: any), and for Azure the deployment of each model and the api-version to ask for."""

    base_url: str
    kind: str = "openai"
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    weight: float = 1.0
    models: frozenset[str] | None = None
    deployments: Mapping[str, str] = attrs.field(factory=dict)
    api_version: str | None = None

    @property
    def served(self) -> frozenset[str] | None:
        """The models it serves: `models`, else the models of its deployments, else None (any)."""
        if self.models is not None:
            return self.models
        return frozenset(self.deployments) if self.deployments else None

    def serves(self, model: object) -> bool:
        """Whether a request for `model` may go here (a request that names no model may go anywhere)."""
        served = self.served
        return served is None or not isinstance(model, str) or model in served


@attrs.frozen
class Route:
    """A path prefix served by one upstream (or several) with their key pools, and forward keys."""

    prefix: str
    base_url: str
    kind: str = "openai"
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    forward_keys: tuple[ForwardKey, ...] = attrs.field(default=(), repr=False)
    allow_client_keys: bool = True
    limits: Limits = NO_LIMITS
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    stream_usage: bool | None = None
    cache: bool = False
    cache_ttl: float | None = None
    cache_scope: str = "caller"
    # Its [[route.upstream]] tables; none: the one upstream of base_url, kind and api_keys.
    upstream_tables: tuple[Upstream, ...] = attrs.field(default=(), repr=False)
    # Whether a 5xx answer to a POST may be replayed on another upstream (the OpenAI SDKs retry them anyway).
    retry_post_5xx: bool = True

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        """Where it sends requests."""
        return self.upstream_tables or (Upstream(self.base_url, self.kind, self.api_keys),)

    @property
    def reads_model(self) -> bool:
        """Whether the model a request names decides where it goes: which upstreams serve it, or the Azure
        deployment an OpenAI-shaped request is sent to."""
        return any(u.served is not None or u.kind == "azure" and self.kind != "azure" for u in self.upstreams)

    @property
    def limited(self) -> bool:
        """Whether anything this route serves is limited: the route itself or one of its forward keys."""
        return bool(self.limits) or any(key.limits for key in self.forward_keys)

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
    data_dir: str = "./Data"
    usage: bool = False
    stream_usage: bool = True
    prices: Mapping[str, Price] = attrs.field(factory=dict, repr=False)
    redis: RedisTarget | None = None
    redis_timeout: float = 0.1
    redis_failure: str = "open"
    cache_ttl: float = 3600.0
    cache_max_size: int = 256 * 1024 * 1024
    redis_secret: str = attrs.field(default="", repr=False)
    config_file: str | None = None
    ignored: tuple[str, ...] = ()

    @property
    def limited(self) -> bool:
        return any(route.limited for route in self.routes)


def unnamed(key: str, index: int, taken: set[str]) -> str:
    """The name of a forward key given without one: its masked form (prefix and last four characters), which
    does not give the key away; a key too short to mask, or masking like an earlier one, is named by its
    place in the list instead."""
    name = mask(key)
    if name == "***" or name in taken:
        name = f"fk-#{index}"
    return name


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
            unknown = set(item) - {"key", "name", "models", "budget", *LIMIT_FIELDS}
            if unknown or not isinstance(item.get("key"), str):
                raise ConfigError(
                    f"{source}: forward key {index} must be a table with key, name, models, rpm, tpm, max_parallel, budget"
                )
            key = parse_one_forward_key(item["key"], source, index)
            models = item.get("models")
            if models is not None and (
                not isinstance(models, (list, tuple)) or not all(isinstance(m, str) for m in models)
            ):
                raise ConfigError(f"{source}: forward key {index} models must be a list of model names")
            name = str(item.get("name") or unnamed(key, index, {k.name for k in keys}))
            limits = parse_limits(item, f"{source}: forward key {name}", budget=True)
            keys.append(ForwardKey(key, name, frozenset(models) if models is not None else None, limits))
        else:
            raise ConfigError(f"{source}: forward key {index} must be a string or a table")
    seen = set()
    limits_by_name: dict[str, Limits] = {}
    for key in keys:
        if key.key in seen:
            raise ConfigError(f"{source}: forward key {key.name} is listed twice")
        seen.add(key.key)
        # Keys sharing a name are one caller: its limits and budget are counted together.
        if limits_by_name.setdefault(key.name, key.limits) != key.limits:
            raise ConfigError(f"{source}: forward keys named {key.name} share their limits, so they must set the same ones")
    return tuple(keys)


def parse_limits(table: Mapping, where: str, budget: bool) -> Limits:
    """The rpm, tpm, max_parallel (and budget) of a forward key or route table."""
    found = {}
    for name in ("rpm", "tpm"):
        if name in table:
            try:
                found[name] = parse_rate(table[name])
            except ValueError as e:
                raise ConfigError(f"{where}: {name}: {e}") from None
    if "max_parallel" in table:
        value = table["max_parallel"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: max_parallel must be a whole number of requests, at least 1")
        found["max_parallel"] = value
    if budget and "budget" in table:
        try:
            found["budget"] = parse_budget(table["budget"])
        except ValueError as e:
            raise ConfigError(f"{where}: budget: {e}") from None
    return Limits(**found) if found else NO_LIMITS


def parse_prices(table: object, where: str) -> dict[str, Price]:
    """`[prices]`: model name = { input = dollars, output = dollars } per million tokens."""
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: prices must be a table of model = {{ input = …, output = … }}")
    prices = {}
    for model, price in table.items():
        if not isinstance(price, Mapping) or set(price) - {"input", "output"} or not price:
            raise ConfigError(f"{where}: prices.{model} must be {{ input = dollars, output = dollars }} per 1M tokens")
        values = [price.get(part, 0) for part in ("input", "output")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e6 for v in values):
            raise ConfigError(f"{where}: prices.{model} must be non-negative numbers of dollars per 1M tokens")
        prices[str(model)] = Price(float(values[0]), float(values[1]))
    return prices


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


UPSTREAM_FIELDS = ("base_url", "kind", "api_keys", "weight", "models", "deployments", "api_version")


def parse_upstreams(tables: object, here: str, client_kind: str = "openai") -> tuple[Upstream, ...]:
    """A route's [[route.upstream]] tables (`client_kind`: how clients speak to the route)."""
    if not isinstance(tables, list) or not tables or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError(f"{here}: upstream must be an array of tables ([[route.upstream]])")
    upstreams = []
    for number, table in enumerate(tables, 1):
        where = f"{here}: upstream {number}"
        unknown = set(table) - set(UPSTREAM_FIELDS)
        if unknown:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        if "base_url" not in table:
            raise ConfigError(f"{where}: base_url is missing")
        kind = table.get("kind", "openai")
        if kind not in KINDS:
            raise ConfigError(f"{where}: kind={kind!r} must be one of {', '.join(KINDS)}")
        weight = table.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1000:
            raise ConfigError(f"{where}: weight must be a number above 0, at most 1000")
        models = table.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)):
            raise ConfigError(f"{where}: models must be a list of model names")
        deployments = table.get("deployments", {})
        if not isinstance(deployments, Mapping) or not all(
            isinstance(d, str) and d and "/" not in d and "?" not in d and "%" not in d for d in deployments.values()
        ):
            raise ConfigError(f"{where}: deployments must be a table of model = \"deployment name\"")
        if deployments and kind != "azure":
            raise ConfigError(f"{where}: deployments are for kind = \"azure\" upstreams")
        api_version = table.get("api_version")
        if api_version is not None and (not isinstance(api_version, str) or not api_version.replace("-", "").isalnum()):
            raise ConfigError(f"{where}: api_version must look like 2024-10-21 or preview")
        if kind == "azure" and api_version is None and client_kind != "azure":
            raise ConfigError(f"{where}: an azure upstream of a route OpenAI clients call needs an api_version "
                              "(e.g. \"2024-10-21\")")
        upstreams.append(Upstream(
            base_url=parse_url(table["base_url"], f"{where}: base_url"),
            kind=kind,
            api_keys=parse_secrets(table.get("api_keys", ()), f"{where}: api_keys"),
            weight=float(weight),
            models=None if models is None else frozenset(models),
            deployments=dict(deployments),
            api_version=api_version,
        ))
    bases = [u.base_url for u in upstreams]
    if len(set(bases)) != len(bases):
        raise ConfigError(f"{here}: two upstreams have the same base_url")
    keyed = [bool(u.api_keys) for u in upstreams]
    if any(keyed) and not all(keyed):
        raise ConfigError(f"{here}: either every upstream has api_keys or none has")
    return tuple(upstreams)


def route_cache(table: Mapping, here: str, default: bool) -> dict:
    """A [[route]]'s cache fields: cache (default: CACHE), cache_ttl, cache_scope."""
    on = table.get("cache", default)
    if not isinstance(on, bool):
        raise ConfigError(f"{here}: cache must be true or false")
    ttl = table.get("cache_ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf")):
        raise ConfigError(f"{here}: cache_ttl must be a positive number of seconds")
    scope = table.get("cache_scope", "caller")
    if scope not in ("caller", "shared"):
        raise ConfigError(f"{here}: cache_scope must be \"caller\" or \"shared\"")
    return {"cache": on, "cache_ttl": None if ttl is None else float(ttl), "cache_scope": scope}


def routes_from_file(tables: object, file_name: str, allow_client_keys: bool, cache: bool = False) -> tuple[Route, ...]:
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError(f"{file_name}: 'route' must be an array of tables ([[route]])")
    if not tables:
        raise ConfigError(f"{file_name}: 'route' is empty; add at least one [[route]] table")
    routes = []
    for number, table in enumerate(tables, 1):
        here = f"[[route]] {number} in {file_name}"
        unknown = set(table) - {
            "prefix", "base_url", "kind", "api_keys", "forward_keys", "allow_client_keys", "default_max_tokens",
            "stream_usage", "cache", "cache_ttl", "cache_scope", "upstream", "retry_post_5xx", *LIMIT_FIELDS,
        }
        if unknown:
            raise ConfigError(f"{here}: unknown field {sorted(unknown)[0]!r}")
        upstreams = ()
        if "upstream" in table:
            if "base_url" in table or "api_keys" in table:
                raise ConfigError(f"{here}: give base_url and api_keys in its [[route.upstream]] tables, not both")
            if table.get("allow_client_keys") is True:
                raise ConfigError(f"{here}: a route of [[route.upstream]] tables serves forward keys only "
                                  "(a client's own key would reach every upstream)")
            upstreams = parse_upstreams(table["upstream"], here, table.get("kind", "openai"))
            table = {**table, "base_url": upstreams[0].base_url,
                     "api_keys": [k for u in upstreams for k in u.api_keys]}
        if "base_url" not in table:
            raise ConfigError(f"{here}: base_url is missing")
        retry = table.get("retry_post_5xx", True)
        if not isinstance(retry, bool):
            raise ConfigError(f"{here}: retry_post_5xx must be true or false")
        allow = table.get("allow_client_keys", allow_client_keys and not upstreams)
        if not isinstance(allow, bool):
            raise ConfigError(f"{here}: allow_client_keys must be true or false")
        stream_usage = table.get("stream_usage")
        if stream_usage is not None and not isinstance(stream_usage, bool):
            raise ConfigError(f"{here}: stream_usage must be true or false")
        default_max = table.get("default_max_tokens", DEFAULT_MAX_TOKENS)
        if isinstance(default_max, bool) or not isinstance(default_max, int) or default_max < 1:
            raise ConfigError(f"{here}: default_max_tokens must be a whole number of tokens, at least 1")
        route = (
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
        routes.append(
            attrs.evolve(
                route,
                limits=parse_limits(table, here, budget=False),
                default_max_tokens=default_max,
                stream_usage=stream_usage,
                **route_cache(table, here, cache),
                upstream_tables=upstreams,
                retry_post_5xx=retry,
            )
        )
    prefixes = [r.prefix for r in routes]
    for prefix in prefixes:
        if prefixes.count(prefix) > 1:
            raise ConfigError(f"{file_name}: two routes have the prefix {prefix or '/'!r}")
    return tuple(routes)


def build(raw: Mapping[str, Raw], file_data: Mapping[str, object] | None = None, file_name: str = "") -> Config:
    """Validate the gathered raw settings into a Config."""
    allow_client_keys = parse_bool(raw["allow_client_keys"])
    ignored = ()
    if file_data and "route" in file_data:
        routes = routes_from_file(file_data["route"], file_name, allow_client_keys, parse_bool(raw["cache"]))
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
        routes = (attrs.evolve(routes[0], cache=parse_bool(raw["cache"])),)
    metrics = str(raw["metrics_port"].value or "").strip()
    prices = parse_prices((file_data or {}).get("prices"), file_name or "the config file")
    usage = parse_usage(raw["usage"], any(route.limited for route in routes))
    if not usage and any(key.limits.budget is not None for route in routes for key in route.forward_keys):
        raise ConfigError(f"{raw['usage'].source}: budgets are kept in the usage store: USAGE cannot be false with a budget")
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
        workers=parse_workers(raw["workers"]),
        metrics_port=parse_port(metrics, raw["metrics_port"].source) if metrics else None,
        grace_period=parse_seconds(raw["grace_period"]),
        body_timeout=parse_seconds(raw["body_timeout"]),
        tls_ciphers=parse_ciphers(raw["tls_ciphers"]),
        check_keys=parse_bool(raw["check_keys"]),
        data_dir=str(raw["data_dir"].value),
        usage=usage,
        stream_usage=parse_bool(raw["stream_usage"]),
        prices=prices,
        redis=parse_redis_url(raw["redis_url"]),
        redis_timeout=parse_seconds(raw["redis_timeout"]),
        redis_failure=parse_choice(raw["redis_failure"], ("open", "closed")),
        cache_ttl=parse_seconds(raw["cache_ttl"]),
        cache_max_size=parse_size(raw["cache_max_size"]),
        redis_secret=str(raw["redis_secret"].value or ""),
        config_file=file_name or None,
        ignored=ignored,
    )


def parse_usage(raw: Raw, limited: bool) -> bool:
    """USAGE: "auto" counts usage when some limit or budget is configured; true or false say so."""
    if str(raw.value).strip().lower() == "auto":
        return limited
    return parse_bool(raw)


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
        if len(route.upstreams) == 1:
            yield f"route {route.name} -> {route.base_url} ({route.kind}; {auth})"
        else:
            yield f"route {route.name} -> {len(route.upstreams)} upstreams ({auth})"
            for upstream in route.upstreams:
                serves = f"; models {', '.join(sorted(upstream.models))}" if upstream.models is not None else ""
                yield (f"  upstream {upstream.base_url} ({upstream.kind}; weight {upstream.weight:g}; "
                       f"{len(upstream.api_keys)} pool keys{serves})")
        if route.no_auth:
            yield (
                f"WARNING: route {route.name} has pool keys but no FORWARD_KEY: anyone who can reach this "
                "proxy uses your upstream keys (no-auth mode)"
            )
    if config.redis is not None:
        yield (f"state shared with other instances through {config.redis} (calls wait {config.redis_timeout:g} s; "
               f"while it is unreachable: {config.redis_failure})")
    for source in config.ignored:
        yield f"note: {source} is ignored because --config has [[route]] tables"
