"""OpenAI-shaped error bodies for the errors the proxy makes itself.  Tests: tests/test_errors.py"""

import json
import math

import attrs


@attrs.frozen
class ProxyError:
    """An error answered by the proxy, not the upstream: status, body fields and extra headers."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> bytes:
        """The JSON body clients' SDKs parse: {"error": {"message", "type", "param", "code"}}."""
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        ).encode()


# Status lines of the errors the proxy answers itself, for answers written before a Request exists.
REASONS = {
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 408: b"Request Timeout",
    413: b"Content Too Large", 429: b"Too Many Requests", 500: b"Internal Server Error", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}


def not_found(what: str) -> ProxyError:
    """No route serves the request; `what` names it without its query (which may hold a key)."""
    return ProxyError(404, f"No route serves {what}: check the base_url and ROUTE_PREFIX.", code="not_found")


def bad_request(message: str) -> ProxyError:
    return ProxyError(400, message, code="bad_http_request")


def bad_http_request() -> ProxyError:
    return bad_request("Malformed HTTP request: the proxy could not frame it.")


def head_timeout(seconds: float) -> ProxyError:
    return ProxyError(408, f"The request headers did not arrive within {seconds:g} s.", code="request_timeout")


def body_timeout(seconds: float) -> ProxyError:
    return ProxyError(
        408, f"The request body stopped arriving for {seconds:g} s (BODY_TIMEOUT).", code="request_timeout"
    )


def internal() -> ProxyError:
    return ProxyError(500, "The proxy failed; see its log.", type="server_error")


def limits_unavailable() -> ProxyError:
    """The limits could not be asked (a worker whose supervisor has gone): nothing was forwarded."""
    return ProxyError(
        503, "The gateway cannot check this key's limits right now; retry shortly.", type="server_error",
        code="limits_unavailable", headers=((b"retry-after", b"1"),),
    )


def bad_cache_header(value: str) -> ProxyError:
    """An x-fwd-cache request header that is not one of use, skip or refresh (`value` is shown cut short)."""
    shown = value[:20].encode("unicode_escape").decode("ascii")
    return ProxyError(400, f"x-fwd-cache must be use, skip or refresh, not {shown!r}.", code="invalid_cache_header",
                      param="x-fwd-cache")


def bad_path() -> ProxyError:
    return ProxyError(400, "The request path has dot-segments; send a normalized path.", code="invalid_path")


def body_too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"Request body is larger than MAX_BODY_SIZE ({limit} bytes).", code="body_too_large")


def missing_key() -> ProxyError:
    return ProxyError(
        401,
        "Missing API key: send 'Authorization: Bearer <forward key>'.",
        type="authentication_error",
        code="missing_api_key",
    )


def unknown_forward_key() -> ProxyError:
    return ProxyError(
        401, "Unknown forward key: check the key you were given.", type="authentication_error", code="invalid_api_key"
    )


def client_keys_forbidden() -> ProxyError:
    return ProxyError(
        401,
        "This proxy accepts forward keys only: use the fk- key you were given.",
        type="authentication_error",
        code="invalid_api_key",
    )


def bad_proxy_key() -> ProxyError:
    return ProxyError(
        401,
        "Missing or wrong proxy key: append ':<proxy key>' to your API key.",
        type="authentication_error",
        code="invalid_proxy_key",
    )


def ip_denied(ip: str) -> ProxyError:
    return ProxyError(403, f"Your address {ip} may not use this proxy.", type="permission_error", code="ip_denied")


def model_refused(why: str) -> ProxyError:
    """A key limited to some models sent a request that would run another, or one that cannot be read one way."""
    return ProxyError(403, f"{why[:1].upper()}{why[1:]}.", type="permission_error", code="model_not_allowed", param="model")


def keys_exhausted(retry_after: float, rate_limited: bool) -> ProxyError:
    seconds = max(1, math.ceil(retry_after))
    header = ((b"Retry-After", str(seconds).encode()),)
    if rate_limited:
        return ProxyError(
            429,
            f"Every upstream key is rate limited; retry in {seconds} s.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers=header,
        )
    return ProxyError(
        503,
        f"No upstream key is usable right now; retry in {seconds} s.",
        type="server_error",
        code="no_upstream_key",
        headers=header,
    )


def no_upstream(model: str | None) -> ProxyError:
    """No upstream of the route serves the model the request names (`model` is shown cut short)."""
    if model is None:
        return ProxyError(404, "No upstream of this route serves this request.", code="model_not_found")
    shown = model[:64].encode("unicode_escape").decode("ascii")
    return ProxyError(404, f"No upstream of this route serves the model {shown!r}.", code="model_not_found",
                      param="model")


def upstream_unreachable(base_url: str, reason: str) -> ProxyError:
    return ProxyError(
        502,
        f"Could not reach the upstream {base_url} ({reason}): check OPENAI_BASE_URL and the network.",
        type="server_error",
        code="upstream_unreachable",
    )


def upstream_timeout(base_url: str, timeout: float) -> ProxyError:
    return ProxyError(
        504,
        f"The upstream {base_url} sent no response headers within {timeout:g} s: check the upstream or raise TIMEOUT.",
        type="server_error",
        code="upstream_timeout",
    )
