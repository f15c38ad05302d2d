"""Errors the proxy makes itself look like OpenAI's, so clients' SDKs raise the usual exceptions."""

import json

import pytest

from fwd import errors


def parsed(error):
    body = json.loads(error.body())
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "error, status, type_, code",
    [
        (errors.not_found("/nowhere"), 404, "invalid_request_error", "not_found"),
        (errors.bad_path(), 400, "invalid_request_error", "invalid_path"),
        (errors.body_too_large(1024), 413, "invalid_request_error", "body_too_large"),
        (errors.missing_key(), 401, "authentication_error", "missing_api_key"),
        (errors.unknown_forward_key(), 401, "authentication_error", "invalid_api_key"),
        (errors.client_keys_forbidden(), 401, "authentication_error", "invalid_api_key"),
        (errors.bad_proxy_key(), 401, "authentication_error", "invalid_proxy_key"),
        (errors.ip_denied("203.0.113.7"), 403, "permission_error", "ip_denied"),
        (errors.model_refused("this key may not use the model 'gpt-4o'"), 403, "permission_error", "model_not_allowed"),
        (errors.keys_exhausted(3, rate_limited=True), 429, "rate_limit_error", "rate_limit_exceeded"),
        (errors.keys_exhausted(3, rate_limited=False), 503, "server_error", "no_upstream_key"),
        (errors.upstream_unreachable("http://up", "DNS lookup failed"), 502, "server_error", "upstream_unreachable"),
        (errors.upstream_timeout("http://up", 30), 504, "server_error", "upstream_timeout"),
    ],
)
def test_each_proxy_error_is_openai_shaped_json_with_the_right_status(error, status, type_, code):
    body = parsed(error)
    assert error.status == status
    assert (body["type"], body["code"]) == (type_, code)
    assert body["message"]


def test_messages_tell_the_user_what_to_check():
    assert "/nowhere" in parsed(errors.not_found("/nowhere"))["message"]
    assert "1024 bytes" in parsed(errors.body_too_large(1024))["message"]
    assert "203.0.113.7" in parsed(errors.ip_denied("203.0.113.7"))["message"]
    assert "within 30 s" in parsed(errors.upstream_timeout("http://up", 30))["message"]
    assert "DNS lookup failed" in parsed(errors.upstream_unreachable("http://up", "DNS lookup failed"))["message"]


def test_a_refused_model_points_at_the_model_parameter_and_says_why():
    body = parsed(errors.model_refused("this key may not use the model 'gpt-4o'"))
    assert body["param"] == "model" and body["message"] == "This key may not use the model 'gpt-4o'."


def test_a_path_with_quotes_and_unicode_still_gives_valid_json():
    assert parsed(errors.not_found('/v1/"\u00e9\\'))["message"].startswith('No route serves /v1/"\u00e9\\')


@pytest.mark.parametrize("rate_limited, status", [(True, 429), (False, 503)])
def test_exhausted_keys_give_429_when_rate_limited_else_503_with_retry_after(rate_limited, status):
    error = errors.keys_exhausted(30, rate_limited=rate_limited)
    assert error.status == status
    assert dict(error.headers) == {b"Retry-After": b"30"}
    assert "retry in 30 s" in parsed(error)["message"]


@pytest.mark.parametrize(
    "wait, header", [(0, b"1"), (0.2, b"1"), (1.0, b"1"), (1.0001, b"2"), (29.5, b"30"), (300, b"300")]
)
def test_retry_after_is_rounded_up_to_whole_seconds_and_at_least_one(wait, header):
    assert dict(errors.keys_exhausted(wait, rate_limited=True).headers)[b"Retry-After"] == header
