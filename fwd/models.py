"""Which model a request makes the upstream run, for forward keys limited to some models.  Pure.
Tests: tests/test_models.py

A forward key with `models` may only make the upstream run those models.  Every request it sends is either
checked or refused with a 403 that says why:

- the model is read from where an upstream reads it: the top-level `model` of a JSON body (fwd.jsonscan), the
  `model` field of a multipart form (fwd.multipart), an Azure deployment in the path (`/openai/deployments/NAME/…`,
  matched after percent-decoding and case-insensitively), and the `model` or `deployment` query parameter (the
  Realtime API).  Every place that names a model must name the same allowed one;
- what could be read two ways is refused: a duplicated or differently spelled `model`, two deployments, a form
  that servers parse apart, a compressed body, two Content-Type headers, a urlencoded form;
- a request that names no model may only read or delete (GET, HEAD, DELETE, OPTIONS), upload a file, or
  cancel something; anything else (a POST that lets the upstream pick its default model) is refused;
- batches are refused outright: they run whatever models their input file names, which a key restricted to
  models must not choose.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote_to_bytes

import attrs

from fwd import multipart
from fwd.jsonscan import MALFORMED, NOT_OBJECT, Members

MODEL = "model"
READ_ONLY = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})
# Writes that run no model: file uploads and their multipart upload sessions, and cancellations.
_MODEL_FREE = re.compile(rb"/files|/uploads(?:/[^/]+/(?:parts|complete))?|/.+/cancel")
_VERSION = re.compile(rb"/(?:openai/v1|v1|openai)(?=/)")


@attrs.frozen
class Named:
    """The models a request names, or why what it names cannot be read one way only."""

    models: tuple[str, ...] = ()
    problem: str | None = None

    def __add__(self, other: Named) -> Named:
        return Named(self.models + other.models, self.problem or other.problem)


NOTHING = Named()


def refused(why: str) -> Named:
    return Named(problem=why)


def path_named(path: bytes) -> Named:
    """The Azure deployment a path names (`…/deployments/NAME/…`, any case, percent-encoded or not)."""
    segments = path.split(b"/")
    decoded = [unquote_to_bytes(segment) for segment in segments]
    if any(b"/" in segment or b"\\" in segment for segment in decoded):
        return refused("the path has an encoded slash, which upstreams may read as two segments")
    found = [n for n, segment in enumerate(decoded) if segment.lower() == b"deployments"]
    if not found:
        return NOTHING
    if len(found) > 1:
        return refused("the path names more than one deployment")
    at = found[0] + 1
    if at >= len(decoded) or not decoded[at]:
        return NOTHING
    try:
        return Named((decoded[at].decode("utf-8"),))
    except UnicodeDecodeError:
        return refused("the deployment in the path is not UTF-8")


def query_named(query: bytes | None) -> Named:
    """A `model` or `deployment` query parameter (the Realtime API names its model there)."""
    if not query:
        return NOTHING
    try:
        pairs = parse_qsl(query.decode("utf-8"), keep_blank_values=True, strict_parsing=False, errors="strict")
    except UnicodeDecodeError:
        return refused("the query string is not UTF-8")
    named = [value for name, value in pairs if name.casefold() in (MODEL, "deployment")]
    if not named:
        return NOTHING
    if len(named) > 1:
        return refused("the query string names a model more than once")
    return Named((named[0],))


def json_named(members: Members) -> Named:
    """The top-level `model` of a JSON body that fwd.jsonscan read."""
    if members.kind == MALFORMED:
        return refused("the body is not valid JSON")
    if members.kind == NOT_OBJECT:
        return NOTHING
    if MODEL in members.duplicates:
        return refused("the body names `model` more than once")
    if MODEL in members.too_large:
        return refused("the body's `model` is not a model name")
    value = members.values.get(MODEL, None)
    if MODEL not in members.values:
        return NOTHING
    if not isinstance(value, str):
        return refused("the body's `model` is not a string")
    return Named((value,))


def form_named(body, content_type: bytes) -> Named:
    """The `model` field of a multipart form, read the one way every server reads it."""
    try:
        parts = multipart.parse_form(body, content_type)
        model = multipart.field(parts, body, MODEL)
    except multipart.MultipartError as e:
        return refused(f"the form cannot be read one way only ({e})")
    return NOTHING if model is None else Named((model,))


def body_kind(content_types: list[bytes] | None, content_encoding: list[bytes] | None, size: int) -> str:
    """How to read a body for its model: "json", "form", "none", or a refusal (a string starting "refuse:")."""
    if not size:
        return "none"
    if content_encoding and any(value.strip().lower() not in (b"", b"identity") for value in content_encoding):
        return "refuse:the body is compressed (Content-Encoding), so its model cannot be read"
    if content_types and len(content_types) > 1:
        return "refuse:the request has two Content-Type headers"
    media = (content_types[0] if content_types else b"").split(b";", 1)[0].strip().lower()
    if media == b"multipart/form-data":
        return "form"
    if media == b"application/x-www-form-urlencoded":
        return "refuse:urlencoded forms are not read for models; send JSON or multipart/form-data"
    if media.startswith(b"multipart/"):
        return "refuse:only multipart/form-data forms are read for models"
    return "json"


def operation(path: bytes) -> bytes:
    """The API operation of a path below a route: without its `/v1`, `/openai/v1` or Azure deployment prefix."""
    lowered = path.lower()
    at = lowered.find(b"/deployments/")
    if at >= 0:
        rest = path[at + len(b"/deployments/") :]
        slash = rest.find(b"/")
        return rest[slash:] if slash >= 0 else b"/"
    match = _VERSION.match(path)
    return path[match.end() :] if match else path


def decide(allowed: frozenset[str], method: bytes, path: bytes, named: Named) -> str | None:
    """Why a request of a key limited to `allowed` models is refused, or None when it may go.

    `path` is the path below the route (as the upstream gets it), `named` what the request names.
    """
    op = operation(path)
    if method == b"POST" and op.rstrip(b"/") == b"/batches":
        return "batches run the models their input file names; a key limited to some models cannot create them"
    if named.problem is not None:
        return named.problem
    models = set(named.models)
    if len(models) > 1:
        return "the request names more than one model"
    if models:
        model = models.pop()
        if model not in allowed:
            return f"this key may not use the model {model!r}"
        return None
    if method in READ_ONLY or _MODEL_FREE.fullmatch(op.rstrip(b"/")):
        return None
    return "this key is limited to some models: name one of them in the request (its `model`)"
