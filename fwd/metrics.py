"""Prometheus metrics, computed from the proxy's own log events.  Tests: tests/test_operations.py

Counting happens in a twisted.logger observer fed by the access events (`fwd.access`), so the request path
does no metrics work of its own and a supervisor process can count what its workers log.  Gauges that describe
the present (requests and streams in flight, key states, transcript write errors) are read at scrape time
from a status callable.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.application import service
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from fwd.answers import ACCESS_NAMESPACE

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})
# Distinct model labels (fwd_tokens_total): a client names the model, so their number is capped.
MAX_MODELS = 256
MAX_MODEL_LENGTH = 128
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def empty_status() -> dict:
    return {"in_flight": 0, "streams": 0, "keys": [], "transcript_write_errors": 0}


class StatusCollector:
    """Gauges read from the live daemon at scrape time."""

    def __init__(self, status: Callable[[], dict]):
        self.status = status

    def collect(self):
        status = self.status()
        yield GaugeMetricFamily("fwd_requests_in_flight", "Requests being forwarded now", value=status["in_flight"])
        yield GaugeMetricFamily("fwd_streams_in_flight", "Event streams being relayed now", value=status["streams"])
        yield GaugeMetricFamily("fwd_realtime_sessions", "Realtime WebSocket sessions open now",
                                value=status.get("sessions", 0))
        keys = GaugeMetricFamily(
            "fwd_upstream_key_state",
            "Processes that see each pool key (masked) in each state; 1 per key with one process",
            labels=["route", "key", "state"],
        )
        for (route, masked, state), count in Tally(tuple(k) for k in status["keys"]).items():
            keys.add_metric([route, masked, state], count)
        yield keys
        yield GaugeMetricFamily(
            "fwd_transcript_write_errors", "Transcript records that could not be written", value=status["transcript_write_errors"]
        )
        upstreams = status.get("upstreams") or []
        if upstreams:
            state = GaugeMetricFamily("fwd_upstream_state", "Processes that see each upstream in each state (serving, "
                                      "resting, trial)", labels=["route", "upstream", "state"])
            in_flight = GaugeMetricFamily("fwd_upstream_in_flight", "Requests waiting on each upstream's answer",
                                          labels=["route", "upstream"])
            errors = CounterMetricFamily("fwd_upstream_errors", "Attempts each upstream failed (refused, timed out, "
                                         "5xx)", labels=["route", "upstream"])
            latency = GaugeMetricFamily("fwd_upstream_latency_ewma_seconds", "Recent time to response headers "
                                        "(moving average; the choice of upstream follows it)", labels=["route", "upstream"])
            totals: dict = {}
            for route, name, now_state, waiting, failed, recent in upstreams:
                entry = totals.setdefault((route, name), [Tally(), 0, 0, []])
                entry[0][now_state] += 1
                entry[1] += waiting
                entry[2] += failed
                if recent is not None:
                    entry[3].append(recent)
            for (route, name), (states, waiting, failed, recents) in totals.items():
                for now_state, count in states.items():
                    state.add_metric([route, name, now_state], count)
                in_flight.add_metric([route, name], waiting)
                errors.add_metric([route, name], failed)
                if recents:
                    latency.add_metric([route, name], sum(recents) / len(recents))
            yield state
            yield in_flight
            yield errors
            yield latency
        cache = status.get("cache")
        if cache is not None:
            yield GaugeMetricFamily("fwd_cache_entries", "Answers held by the embedded response cache",
                                    value=cache["entries"])
            yield GaugeMetricFamily("fwd_cache_bytes", "Bytes held by the embedded response cache", value=cache["bytes"])
        redis = status.get("redis")
        if redis is not None:
            yield GaugeMetricFamily("fwd_redis_up", "1 while state is shared through Redis, 0 while it is local",
                                    value=1 if redis["up"] else 0)
            yield CounterMetricFamily("fwd_redis_failures", "Times Redis stopped answering in time",
                                      value=redis["failures"])


@implementer(ILogObserver)
class Metrics:
    """The daemon's Prometheus registry, fed by access events."""

    def __init__(self, status: Callable[[], dict] = empty_status):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fwd_requests", "Requests answered, by route, method and status", ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fwd_upstream_latency_seconds", "Time from receiving a request to its last byte relayed", ["route"],
            buckets=SECONDS_BUCKETS, registry=self.registry,
        )
        self.ttfb = Histogram(
            "fwd_upstream_ttfb_seconds", "Time from receiving a request to the upstream's response headers", ["route"],
            buckets=SECONDS_BUCKETS, registry=self.registry,
        )
        self.tokens = Counter(
            "fwd_tokens", "Tokens used, by caller (forward key name), model and kind (input, output)",
            ["caller", "model", "kind"], registry=self.registry,
        )
        self.estimated = Counter(
            "fwd_estimated_tokens", "Tokens of fwd_tokens_total that were estimated: no usage came back",
            ["caller", "model"], registry=self.registry,
        )
        self.refusals = Counter(
            "fwd_limit_refusals", "Requests the limits refused (429), by caller and reason (rate, too_large, "
            "parallel, budget)", ["caller", "reason"], registry=self.registry,
        )
        self.cache = Counter(
            "fwd_cache_requests", "Answers on caching routes, by route and result (HIT, MISS, SKIP)", ["route", "result"],
            registry=self.registry,
        )
        self.cache_stored = Counter(
            "fwd_cache_stored_bytes", "Bytes of answers the response cache stored", ["route"], registry=self.registry,
        )
        self.models: set[str] = set()
        self.registry.register(StatusCollector(status))

    def model_label(self, model) -> str:
        """A model's label: the model a client names is its own choice, so only the first MAX_MODELS distinct
        names get labels of their own, and the rest count as "other"."""
        if not isinstance(model, str) or not model:
            return "-"
        if model in self.models:
            return model
        if len(self.models) >= MAX_MODELS or len(model) > MAX_MODEL_LENGTH:
            return "other"
        self.models.add(model)
        return model

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") != ACCESS_NAMESPACE:
            return
        route = event.get("route") or "-"
        method = event.get("method", "")
        self.requests.labels(route, method if method in METHODS else "OTHER", str(event.get("status", 0))).inc()
        limit = event.get("limit")
        if limit is not None:
            self.refusals.labels(event.get("caller") or "-", limit).inc()
        tokens_in = event.get("input_tokens")
        if tokens_in is not None:
            caller, model = event.get("caller") or "-", self.model_label(event.get("model"))
            tokens_out = event.get("output_tokens") or 0
            self.tokens.labels(caller, model, "input").inc(tokens_in)
            self.tokens.labels(caller, model, "output").inc(tokens_out)
            if event.get("estimated"):
                self.estimated.labels(caller, model).inc(tokens_in + tokens_out)
        result = event.get("cache")
        if result is not None:
            self.cache.labels(route, result).inc()
            if event.get("cache_stored"):
                self.cache_stored.labels(route).inc(event["cache_stored"])
        if event.get("upstream") and result != "HIT":
            self.latency.labels(route).observe(event.get("duration_ms", 0.0) / 1000)
            ttfb = event.get("ttfb_ms")
            if ttfb is not None:
                self.ttfb.labels(route).observe(ttfb / 1000)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """`/metrics` in the Prometheus text format, on its own listener."""

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics
        self.putChild(b"metrics", MetricsPage(metrics))


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.exposition()


class MetricsService(service.MultiService):
    """Counts access events into Prometheus metrics and serves /metrics on its own listener."""

    def __init__(self, description: str, status: Callable[[], dict], transcripts, reactor, ciphers: str):
        """`status` describes the requests in flight and the keys; `transcripts` is the TranscriptService
        whose write errors are counted, or None."""
        from fwd.listeners import Listener

        super().__init__()

        def everything() -> dict:
            return {**status(), "transcript_write_errors": transcripts.write_errors if transcripts is not None else 0}

        self.metrics = Metrics(everything)
        site = Site(MetricsResource(self.metrics))
        site.noisy = False
        Listener(description, site, reactor, ciphers, option="--metrics-port").setServiceParent(self)

    def startService(self):
        globalLogPublisher.addObserver(self.metrics)
        super().startService()

    def stopService(self):
        globalLogPublisher.removeObserver(self.metrics)
        return super().stopService()
