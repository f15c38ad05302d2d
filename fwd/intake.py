"""What the gateway reads from a request before it forwards it: where it goes upstream, and what its body says
(its model, for keys limited to some models; its parameters, for a transcript of a body too big to keep).
Tests: tests/test_models.py, tests/test_hardening.py

A JSON body's top-level members are found by fwd.jsonscan in slices of bounded work: a slice runs, then the
reactor serves everyone else, then the next slice.  A 10 MB body of three million tiny objects costs its own
client a few hundred milliseconds and every other client nothing they would notice; a small body is read in
one slice, at once.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Iterable

import attrs
import orjson
from twisted.internet import defer, task

from fwd import errors, models
from fwd.jsonscan import BUDGET, OBJECT, Members, Scanner, scan
from fwd.transcripts.assembly import DEFAULT_LIMIT, transcript_kind

# The top-level parameters a transcript keeps of a request too big to keep whole (the rest of it is cut).
TRANSCRIPT_PARAMETERS = (
    "model", "stream", "temperature", "top_p", "max_tokens", "max_completion_tokens", "max_output_tokens", "n",
    "stop", "seed", "user", "presence_penalty", "frequency_penalty", "response_format", "tool_choice",
    "parallel_tool_calls", "reasoning_effort", "reasoning", "service_tier", "store", "stream_options", "logprobs",
    "top_logprobs", "modalities", "encoding_format", "dimensions", "metadata", "truncation", "background",
)
SMALL_VALUE = 4096
# A JSON body read only for metering and limits is decoded at once up to this size (tens of microseconds at
# worst); larger ones are scanned in slices like any other.
AT_ONCE = 16 * 1024


@attrs.frozen
class Target:
    """Where a request goes upstream: its path below the route's mount point, and its query verbatim."""

    rest: bytes
    query: bytes | None

    @classmethod
    def of(cls, request, mounted_at: int) -> Target:
        rest = b"/".join(request.path.split(b"/")[1 + mounted_at :])
        _, question, query = request.uri.partition(b"?")
        return cls(rest, query if question else None)

    @property
    def path(self) -> bytes:
        """The path the upstream sees below its base URL."""
        return b"/" + self.rest


@attrs.frozen
class Facts:
    """What was read from a request: a refusal it earned, or its top-level members (those asked for), the size
    of its JSON body (0 for any other body) and that body when it was read into memory."""

    refusal: errors.ProxyError | None = None
    members: Members | None = None
    json_size: int = 0
    body: bytes | None = attrs.field(default=None, repr=False)

    @property
    def values(self) -> dict:
        return self.members.values if self.members is not None else {}

    def without_body(self) -> Facts:
        """The same facts, the body let go (attrs.evolve does the same at a few times the cost, every request)."""
        return Facts(self.refusal, self.members, self.json_size, None)


NOTHING_READ = Facts()


# How long the gateway's cooperative work (body scans, spooled bodies sent upstream) may run in one reactor turn:
# Twisted's default is 10 ms, which other clients would feel as added latency.
SLICE_SECONDS = 0.002


def _one_slice():
    end = time.monotonic() + SLICE_SECONDS
    return lambda: time.monotonic() >= end


def cooperator_for(clock) -> task.Cooperator:
    """A Cooperator whose slices (of at most SLICE_SECONDS) run on `clock` (the reactor, or a Clock in tests),
    one per reactor turn."""
    return task.Cooperator(terminationPredicateFactory=_one_slice, scheduler=lambda run: clock.callLater(0, run))


def read_members(body, names: Iterable[str], cooperator: task.Cooperator, budget: int = BUDGET):
    """The requested top-level members of a JSON body (bytes, or a memory map of a spooled one): the Members
    at once for a body read in one slice, else a Deferred of them that stops reading when cancelled."""
    if len(body) <= SMALL_VALUE:
        return scan(body, names, SMALL_VALUE)  # a few kilobytes: less work than a slice
    scanner = Scanner(body, names, SMALL_VALUE)
    if scanner.step(budget):
        return scanner.result

    def slices():
        while not scanner.step(budget):
            yield None

    reading = cooperator.cooperate(slices())

    def cancel(_):
        try:
            reading.stop()
        except task.TaskDone:
            pass

    done = defer.Deferred(cancel)
    def failed(reason):
        if not done.called and not reason.check(task.TaskStopped):
            done.errback(reason)

    reading.whenDone().addCallbacks(lambda _: done.called or done.callback(scanner.result), failed)
    return done


def json_object(body: bytes) -> dict | None:
    """A small JSON body as a lenient parser (the upstream's) reads it, the last of a duplicated name winning;
    None when it is not a JSON object."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document if type(document) is dict else None


def parameters(body: bytes, names: Iterable[str]) -> Members | None:
    """The requested top-level members of a small JSON body (see json_object), or None when it is not a JSON
    object."""
    document = json_object(body)
    if document is None:
        return None
    return Members(OBJECT, {name: document[name] for name in names if name in document})


def body_size(content) -> int:
    if content is None:
        return 0
    size = getattr(content, "size", None)
    if size is not None:
        return size
    content.seek(0, 2)
    return content.tell()


def body_view(content):
    """The body as bytes, or a read-only memory map when it was spooled to a file (for forms, which can be
    large uploads and are read with `find` alone)."""
    if content is None:
        return b""
    view = getattr(content, "view", None)
    if view is not None:
        return view()
    content.seek(0)
    return content.read()


def body_bytes(content) -> bytes:
    """The whole body in memory (a JSON body is scanned as bytes)."""
    if content is None:
        return b""
    content.seek(0)
    return content.read()


def read_request(gateway, request, admission, target: Target, wanted: Iterable[str] = ()):
    """Read what forwarding this request needs from its body: its Facts, or a Deferred of them when the body
    is read in slices.  `wanted` names more top-level members to read from a JSON body (the parameters of
    metering and limits)."""
    forward_key = admission.decision.forward_key
    limited = forward_key is not None and forward_key.models is not None
    if not limited and not gateway.log_chat and not wanted:
        return NOTHING_READ
    size = body_size(request.content)
    names: list[str] = []
    headers = request.requestHeaders
    kind = models.body_kind(headers.getRawHeaders(b"content-type"), headers.getRawHeaders(b"content-encoding"), size)
    named = models.NOTHING
    view = b""
    form = models.NOTHING
    if kind == "form" and (limited or models.MODEL in wanted):
        # A form names its model in a field: for the key's model list, or to choose where the request goes.
        view = body_view(request.content)
        form = models.form_named(view, headers.getRawHeaders(b"content-type")[0])
    form_members = Members(OBJECT, {models.MODEL: form.models[0]}) if len(form.models) == 1 else None
    if limited:
        named = models.path_named(target.path) + models.query_named(target.query)
        if kind.startswith("refuse:"):
            named = named + models.refused(kind.removeprefix("refuse:"))
        elif kind == "form":
            named = named + form
        elif kind == "json":
            names.append(models.MODEL)
    if kind == "json":
        names += [name for name in wanted if name not in names]
        if size > DEFAULT_LIMIT and gateway.log_chat and request.method == b"POST" and transcript_kind(
            request.path.decode("latin-1")
        ):
            names += [name for name in TRANSCRIPT_PARAMETERS if name not in names]
    json_size = size if kind == "json" else 0
    if not names:
        _close(view)
        if limited:
            return _judged(forward_key, request.method, target, named, form_members, json_size, None)
        return Facts(members=form_members, json_size=json_size)
    _close(view)
    view = body_bytes(request.content)
    if not limited and size <= AT_ONCE:
        # Parameters for metering and limits only: what decides no access is read the way the upstream reads it.
        return Facts(members=parameters(view, names), json_size=json_size, body=view)
    reading = read_members(view, names, gateway.cooperator)

    def judged(members: Members) -> Facts:
        body = view
        if not limited:
            return Facts(members=members if members.kind == OBJECT else None, json_size=json_size, body=body)
        return _judged(forward_key, request.method, target, named + models.json_named(members), members, json_size, body)

    if not isinstance(reading, defer.Deferred):
        return judged(reading)

    def failed(reason):
        _close(view)
        return reason

    return reading.addCallbacks(judged, failed)


def _judged(forward_key, method: bytes, target: Target, named: models.Named, members: Members | None,
            json_size: int, body: bytes | None) -> Facts:
    why = models.decide(forward_key.models, method, target.path, named)
    if why is not None:
        return Facts(refusal=errors.model_refused(why))
    return Facts(members=members if members is not None and members.kind == OBJECT else None, json_size=json_size,
                 body=body)


def _close(view) -> None:
    if isinstance(view, mmap.mmap):
        view.close()
