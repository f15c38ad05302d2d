"""OpenAI-shaped requests sent to an Azure OpenAI upstream: where each goes.  Pure.  Tests: tests/test_azure.py

A client that speaks plain OpenAI (`POST /v1/chat/completions` with `"model": "gpt-4o"`) on a route whose chosen
upstream is `kind = "azure"` is sent to that model's deployment:

| OpenAI path (below the route)          | Azure path                                                     |
| -------------------------------------- | -------------------------------------------------------------- |
| /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/images/generations, /v1/images/edits, /v1/audio/transcriptions, /v1/audio/translations, /v1/audio/speech | /openai/deployments/{deployment}/… ?api-version=… |
| /v1/responses (and /v1/responses/…)    | /openai/v1/responses… (Azure's v1 API; the model is the deployment name) |
| /v1/realtime?model=… (WebSocket)        | /openai/realtime?api-version=…&deployment=… (the `model` parameter replaced) |
| anything else under /v1 (models, files, batches, …) | /openai/… ?api-version=…                          |

The deployment is `deployments[model]`, or the model's own name when the table does not list it (Azure's
default naming).  The pool key goes in `api-key` (fwd.keys).  The answer and the stream come back as they are.
"""

from __future__ import annotations

import re
from urllib.parse import quote

# The operations Azure serves under a deployment.
DEPLOYMENT_OPERATIONS = frozenset(
    (b"chat/completions", b"completions", b"embeddings", b"images/generations", b"images/edits",
     b"audio/transcriptions", b"audio/translations", b"audio/speech")
)
_V1 = re.compile(rb"\Av1/(.+?)/?\Z")


class Unmapped(ValueError):
    """The request cannot be sent to this Azure upstream (it names no model where a deployment is needed, or its
    model is deployed under another name where the body would have to change)."""


def azure_target(rest: bytes, query: bytes | None, model: object, deployments, api_version: str | None
                 ) -> tuple[bytes, bytes | None]:
    """The path below an Azure upstream's base URL and the query for an OpenAI-shaped request whose path below the
    route is `rest` (without its leading slash) and whose body names `model`."""
    found = _V1.match(rest)
    if found is None:
        return rest, query  # not an OpenAI API path: as it came
    operation = found.group(1)
    if operation == b"responses" or operation.startswith(b"responses/"):
        if isinstance(model, str) and deployments.get(model, model) != model:
            raise Unmapped("the Responses API names the deployment in the body: deploy the model under its own name")
        return b"openai/v1/" + operation, query
    if operation == b"realtime":
        if not isinstance(model, str) or not model:
            raise Unmapped("the session names no model, so no deployment can serve it")
        deployment = quote(deployments.get(model, model), safe="-_.").encode()
        kept = [part for part in (query or b"").split(b"&") if part and part.split(b"=", 1)[0].lower() != b"model"]
        return b"openai/realtime", with_api_version(b"&".join([*kept, b"deployment=" + deployment]), api_version)
    versioned = with_api_version(query, api_version)
    if operation in DEPLOYMENT_OPERATIONS:
        if not isinstance(model, str) or not model:
            raise Unmapped("the request names no model, so no deployment can serve it")
        name = deployments.get(model, model)
        if name in (".", ".."):
            raise Unmapped("no deployment is named . or ..")
        deployment = quote(name, safe="-_.").encode()
        return b"openai/deployments/" + deployment + b"/" + operation, versioned
    return b"openai/" + operation, versioned


def with_api_version(query: bytes | None, api_version: str | None) -> bytes | None:
    """The query with api-version set (a client's own api-version wins)."""
    if api_version is None:
        return query
    if query and any(part.split(b"=", 1)[0].lower() == b"api-version" for part in query.split(b"&")):
        return query
    added = b"api-version=" + api_version.encode()
    return added if not query else query + b"&" + added
