"""The Resource tree: `/healthz`, and each route's prefix with a ForwardResource leaf.  Tests: tests/test_resource.py

`ForwardResource` is the public forwarding leaf: mount it anywhere in a twisted.web tree and it forwards every
request below its mount point to its route's upstream (see the README's "Embedding" section).  Under the
daemon's own Site (fwd.site) each resource also judges the request's head before the body is read
(`judge_head`); under any other Site the leaf judges the whole request when it renders.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from fwd import errors
from fwd.answers import JSON, send_error
from fwd.exchange import Exchange
from fwd.gateway import Gateway
from fwd.intake import Facts, Target, read_request
from fwd.limits import Refusal
from fwd.metering import PARAMETERS
from fwd.quota import NOTHING_RESERVED, refused
from fwd.realtime import is_upgrade
from fwd.realtime_session import (
    RealtimeSession,
    credential_from_subprotocol,
    upgrade_refusal,
)

log = Logger(namespace="fwd.resource")
MODEL = ("model",)


def asks_upgrade(request) -> bool:
    """Whether a request asks to become a WebSocket (a Realtime session)."""
    if request.method != b"GET":
        return False
    headers = request.requestHeaders
    return is_upgrade(request.method, headers.getRawHeaders(b"upgrade"), headers.getRawHeaders(b"connection"))


class ForwardResource(Resource):
    """Forwards every request below where it is mounted to one route's upstream, streaming the answer back.

    `route` names the gateway's route to serve (its prefix, or "/"); by default the gateway's only route.
    The route is looked up per request, so a reload (SIGHUP) that changes its keys applies at once.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway, route: str | None = None):
        super().__init__()
        if route is None:
            if len(gateway.routes) != 1:
                raise ValueError("name the route to serve: the gateway has several")
            route = next(iter(gateway.routes))
        self.gateway = gateway
        self.route_name = route

    def judge_head(self, request) -> errors.ProxyError | None:
        """Judge the request as soon as its head has arrived (the daemon's Site calls this)."""
        active = self.gateway.route(self.route_name)
        if active is None:
            return errors.not_found(request.path.decode("latin-1"))
        if asks_upgrade(request):
            refusal = credential_from_subprotocol(request, active.route.kind)
            if refusal is not None:
                return refusal
        outcome = self.gateway.judge(request, active)
        if isinstance(outcome, errors.ProxyError):
            return outcome
        request.admission = (active, outcome)
        return None

    def render(self, request):
        if getattr(request, "admission", None) is None:
            refusal = self.judge_head(request)
            if refusal is not None:
                send_error(request, refusal)
                return NOT_DONE_YET
        active, admission = request.admission
        target = Target.of(request, mounted_at=len(request.prepath))
        if asks_upgrade(request):
            self._upgrade(request, active, admission, target)
            return NOT_DONE_YET
        terms = self.gateway.terms(active, admission, request.method, target.path)
        wanted = PARAMETERS if terms.metered else MODEL if active.reads_model else ()
        reading = read_request(self.gateway, request, admission, target, wanted)
        self._when(reading, request, self._admit, request, active, admission, target, terms)
        return NOT_DONE_YET

    @staticmethod
    def _when(waiting, request, then, *args) -> None:
        """Go on with `then` once `waiting` (a value, or a Deferred of it) is known: at once when it is, else
        when it fires (a large body read in slices, a limit decided elsewhere), unless the client left meanwhile."""
        if not isinstance(waiting, defer.Deferred):
            then(waiting, *args)
            return
        went_on = []

        def go(value):
            went_on.append(True)
            return then(value, *args)

        waiting.addCallback(go)
        waiting.addErrback(ForwardResource._broken, request)
        if not went_on:  # it is still on its way (a fired Deferred may be waiting on another)
            request.notifyFinish().addErrback(lambda _: waiting.cancel())

    @staticmethod
    def _broken(reason, request) -> None:
        """What went wrong on the way to forwarding (a bug): answer 500 rather than leave the client waiting."""
        if reason.check(defer.CancelledError):
            return
        log.error("request failed before forwarding: {problem}", problem=reason.type.__name__)
        if not request.finished and not getattr(request, "gone", False) and not getattr(request, "forwarded", False):
            send_error(request, errors.internal())

    def _admit(self, facts: Facts, request, active, admission, target, terms) -> None:
        """Admit the request on its limits (fwd.quota) once what its body says is known, or answer the refusal
        it earned."""
        if facts.refusal is not None:
            send_error(request, facts.refusal)
            return
        if getattr(request, "gone", False):
            return
        cached = self.gateway.cache.plan(request, active, admission, target, facts)
        if isinstance(cached, errors.ProxyError):
            send_error(request, cached)
            return
        if not terms.plan:
            self._forward(None, request, active, admission, target, terms, facts, cached)
            return
        deciding = self.gateway.admit(terms, facts)
        if isinstance(deciding, defer.Deferred):
            deciding.addErrback(self._undecided)
        self._when(deciding, request, self._forward, request, active, admission, target, terms, facts, cached)

    @staticmethod
    def _undecided(reason):
        """The limits could not decide (a bug, or a store that failed): answer 503, forward nothing."""
        if reason.check(defer.CancelledError):
            return reason
        log.error("admission failed: {problem}", problem=reason.type.__name__)
        return errors.limits_unavailable()

    def _admitted(self, ticket, request) -> bool:
        """Whether the limits' answer lets the request go on; else it is answered (the 429 the limits gave it, or
        their 503), or its ticket given back when the client has left meanwhile."""
        if isinstance(ticket, Refusal):
            request.limited = ticket.reason
            send_error(request, refused(ticket))
            return False
        if isinstance(ticket, errors.ProxyError):
            send_error(request, ticket)
            return False
        if getattr(request, "gone", False):
            if ticket is not None:
                self.gateway.quota.release(ticket)
            return False
        return True

    def _forward(self, ticket, request, active, admission, target, terms, facts: Facts, cached=None) -> None:
        """Answer the admitted request from the cache or upstream."""
        if not self._admitted(ticket, request):
            return
        exchange = Exchange(self.gateway, active, admission, request, target, facts, terms, ticket, cached)
        request.notifyFinish().addErrback(exchange.client_lost)
        exchange.start(self.gateway.cache.lookup(cached) if cached is not None else None)

    def _upgrade(self, request, active, admission, target) -> None:
        """A Realtime session: judged like a request (its model, its limits) before its upgrade is accepted."""
        refusal = upgrade_refusal(request, admission.decision.forward_key, target)
        if refusal is not None:
            send_error(request, refusal)
            return
        terms = self.gateway.terms(active, admission, b"GET", target.path)
        if not terms.plan:
            self._open_session(None, request, active, admission, target, None)
            return
        deciding = self.gateway.quota.admit(terms.plan, NOTHING_RESERVED)
        if isinstance(deciding, defer.Deferred):
            deciding.addErrback(self._undecided)
        self._when(deciding, request, self._open_session, request, active, admission, target, terms.plan)

    def _open_session(self, ticket, request, active, admission, target, plan) -> None:
        if self._admitted(ticket, request):
            RealtimeSession(self.gateway, active, admission, request, target, ticket, plan).start()


class HealthResource(Resource):
    """`/healthz`: answered by the daemon itself, to clients its IP lists admit."""

    isLeaf = True

    def __init__(self, gateway: Gateway):
        super().__init__()
        self.gateway = gateway

    def judge_head(self, request) -> errors.ProxyError | None:
        return self.gateway.refuses_client(request)

    def render(self, request):
        refusal = self.judge_head(request)
        if refusal is not None:
            send_error(request, refusal)
            return NOT_DONE_YET
        gateway = self.gateway
        request.setResponseCode(503 if gateway.draining else 200)
        request.responseHeaders.setRawHeaders(b"content-type", JSON)
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        return json.dumps(gateway.health()).encode()


class NotFound(Resource):
    """What no route serves: a JSON 404, judged from the head alone."""

    isLeaf = True

    def judge_head(self, request) -> errors.ProxyError:
        return errors.not_found(request.path.decode("latin-1"))

    def render(self, request):
        send_error(request, self.judge_head(request))
        return NOT_DONE_YET


NOT_FOUND = NotFound()


class PrefixNode(Resource):
    """One path segment of the tree: named children, and the route served at this point (if any) for
    everything else below it."""

    def __init__(self):
        super().__init__()
        self.served: Resource | None = None

    def getChild(self, name, request):
        if self.served is None:
            return NOT_FOUND
        # The segment belongs to the path the route forwards: give it back.
        request.postpath.insert(0, request.prepath.pop())
        return self.served

    def judge_head(self, request) -> errors.ProxyError | None:
        """A request for exactly this node's path: its route's judgement, or 404."""
        if self.served is None:
            return errors.not_found(request.path.decode("latin-1"))
        return self.served.judge_head(request)

    def render(self, request):
        if self.served is None:
            return NOT_FOUND.render(request)
        return self.served.render(request)


class GatewayRoot(PrefixNode):
    """The daemon's root: `/healthz`, then each route at its prefix (the longest prefix wins)."""

    def __init__(self, gateway: Gateway):
        super().__init__()
        self.gateway = gateway
        self.health = HealthResource(gateway)
        self.mount()

    def mount(self) -> None:
        """(Re)build the tree from the gateway's routes, e.g. after a reload."""
        self.children = {}
        self.served = None
        for name, active in self.gateway.routes.items():
            node: PrefixNode = self
            for segment in active.route.prefix.encode().split(b"/")[1:]:
                child = node.children.get(segment)
                if child is None:
                    child = node.children[segment] = PrefixNode()
                node = child
            node.served = ForwardResource(self.gateway, name)

    def getChildWithDefault(self, name, request):
        if name == b"healthz" and not request.postpath:
            return self.health
        return super().getChildWithDefault(name, request)
