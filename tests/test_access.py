"""Who may use the proxy and with which key; which model a request asks for; which paths reach which route."""

import ipaddress

import pytest

from fwd import access
from fwd.access import escapes
from fwd.config import ForwardKey, Route

POOL = "sk-pool-AAAAAAAAAAAAAAAA1111"
ALICE = ForwardKey("fk-alice-BBBBBBBBBBBB2222", "alice")
BOB = ForwardKey("fk-bob-CCCCCCCCCCCC3333", "bob", frozenset({"gpt-4o-mini"}))
OWN = "sk-own-DDDDDDDDDDDDDDDD4444"


def nets(*items):
    return tuple(ipaddress.ip_network(i, strict=False) for i in items)


# Client address ---------------------------------------------------------------------------------------------

TRUSTED = nets("10.0.0.0/8", "fd00::/8")


def test_without_trusted_proxies_the_client_is_the_socket_peer():
    assert access.client_ip("203.0.113.9", [b"198.51.100.1"], ()) == "203.0.113.9"


def test_behind_a_trusted_proxy_the_client_is_the_right_most_untrusted_hop():
    assert access.client_ip("10.0.0.2", [b"198.51.100.1, 203.0.113.7"], TRUSTED) == "203.0.113.7"


def test_a_spoofed_left_most_hop_is_ignored():
    xff = [b"1.2.3.4, 203.0.113.7, 10.0.0.5"]
    assert access.client_ip("10.0.0.2", xff, TRUSTED) == "203.0.113.7"


def test_hops_from_several_x_forwarded_for_lines_are_read_in_order():
    assert access.client_ip("10.0.0.2", [b"1.2.3.4", b"203.0.113.7"], TRUSTED) == "203.0.113.7"


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored():
    assert access.client_ip("198.51.100.66", [b"203.0.113.7"], TRUSTED) == "198.51.100.66"


def test_an_ipv4_mapped_ipv6_peer_counts_as_its_ipv4_address():
    assert access.client_ip("::ffff:10.0.0.2", [b"203.0.113.7"], TRUSTED) == "203.0.113.7"


def test_ipv6_hops_are_understood():
    assert access.client_ip("fd00::1", [b"2001:db8::7, fd00::2"], TRUSTED) == "2001:db8::7"


def test_a_garbage_hop_does_not_become_the_client_address():
    assert access.client_ip("10.0.0.2", [b"203.0.113.7, not-an-ip"], TRUSTED) == "10.0.0.2"


def test_when_every_hop_is_trusted_the_left_most_is_the_client():
    assert access.client_ip("10.0.0.2", [b"10.9.9.9, 10.0.0.5"], TRUSTED) == "10.9.9.9"


def test_without_x_forwarded_for_the_trusted_peer_is_the_client():
    assert access.client_ip("10.0.0.2", None, TRUSTED) == "10.0.0.2"


# IP lists ---------------------------------------------------------------------------------------------------


def test_without_lists_everyone_is_allowed():
    assert access.ip_allowed("203.0.113.7", (), ())


def test_a_whitelist_admits_listed_addresses_and_networks_only():
    whitelist = nets("203.0.113.7", "192.168.0.0/16", "2001:db8::/32")
    assert access.ip_allowed("203.0.113.7", whitelist, ())
    assert access.ip_allowed("192.168.44.1", whitelist, ())
    assert access.ip_allowed("2001:db8::1", whitelist, ())
    assert access.ip_allowed("::ffff:192.168.44.1", whitelist, ())
    assert not access.ip_allowed("203.0.113.8", whitelist, ())
    assert not access.ip_allowed("unix", whitelist, ())


def test_the_blacklist_wins_over_the_whitelist():
    assert not access.ip_allowed("192.168.1.5", nets("192.168.0.0/16"), nets("192.168.1.0/24"))
    assert access.ip_allowed("192.168.2.5", nets("192.168.0.0/16"), nets("192.168.1.0/24"))
    assert not access.ip_allowed("198.51.100.1", (), nets("198.51.100.1"))


# Credentials ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, token",
    [
        (b"Bearer sk-abc", "sk-abc"),
        (b"bearer   sk-abc  ", "sk-abc"),
        (b"Basic dXNlcjpwYXNz", None),
        (b"Bearer", None),
        (b"Bearer   ", None),
        (b"", None),
        (None, None),
    ],
)
def test_bearer_reads_the_token_of_an_authorization_header(header, token):
    assert access.bearer(header) == token


PROXY_KEYS = ("pk-one-1111", "pk-two-2222")


def test_a_proxy_key_suffix_is_checked_and_stripped():
    assert access.split_proxy_key(f"{OWN}:pk-one-1111", PROXY_KEYS) == OWN
    assert access.split_proxy_key(f"{OWN}:pk-two-2222", PROXY_KEYS) == OWN


def test_a_proxy_key_alone_leaves_no_key():
    assert access.split_proxy_key("pk-two-2222", PROXY_KEYS) == ""


@pytest.mark.parametrize("credential", [f"{OWN}:pk-wrong", OWN, f"{OWN}:", f"{OWN}:pk-one-111", ""])
def test_a_wrong_or_missing_proxy_key_is_refused(credential):
    assert access.split_proxy_key(credential, PROXY_KEYS) is None


# Decisions --------------------------------------------------------------------------------------------------

GUARDED = Route(prefix="", base_url="http://up", api_keys=(POOL,), forward_keys=(ALICE, BOB))
NO_AUTH = Route(prefix="", base_url="http://up", api_keys=(POOL,))
BARE = Route(prefix="", base_url="http://up")
STRICT = Route(prefix="", base_url="http://up", api_keys=(POOL,), forward_keys=(ALICE,), allow_client_keys=False)


def decide(route, credential, proxy_keys=()):
    return access.decide(route, access.ForwardKeyTable(route.forward_keys), credential, proxy_keys)


def refused_with(decision, status, code):
    assert decision.error is not None and not decision.use_pool and decision.client_key is None
    assert (decision.error.status, decision.error.code) == (status, code)


def test_a_forward_key_is_served_from_the_pool_under_its_name():
    decision = decide(GUARDED, BOB.key)
    assert decision.use_pool and decision.error is None
    assert decision.forward_key == BOB and decision.caller == "bob"


def test_an_unknown_forward_key_is_401_locally():
    decision = decide(GUARDED, "fk-mallory-EEEEEEEEEEEE5555")
    refused_with(decision, 401, "invalid_api_key")
    assert "Unknown forward key" in decision.error.message


def test_a_forward_key_on_a_route_without_forward_keys_is_unknown():
    refused_with(decide(BARE, ALICE.key), 401, "invalid_api_key")


def test_no_credentials_on_a_route_with_forward_keys_is_401():
    refused_with(decide(GUARDED, None), 401, "missing_api_key")


def test_no_credentials_in_no_auth_mode_uses_the_pool():
    decision = decide(NO_AUTH, None)
    assert decision.use_pool and decision.error is None and decision.caller == "anonymous"


def test_no_credentials_on_a_route_without_keys_goes_upstream_without_a_key():
    decision = decide(BARE, None)
    assert not decision.use_pool and decision.client_key is None and decision.error is None


@pytest.mark.parametrize("credential", [OWN, "sk-anything", "fk-whatever-sdk-placeholder"])
def test_in_no_auth_mode_whatever_key_the_client_sends_the_pool_serves_it(credential):
    decision = decide(NO_AUTH, credential)
    assert decision.use_pool and decision.client_key is None and decision.error is None


@pytest.mark.parametrize("route", [GUARDED, BARE])
def test_a_clients_own_key_passes_through_unchanged(route):
    decision = decide(route, OWN)
    assert not decision.use_pool and decision.client_key == OWN and decision.error is None
    assert decision.caller == "own-key"


def test_a_clients_own_key_is_401_when_the_operator_forbids_it():
    decision = decide(STRICT, OWN)
    refused_with(decision, 401, "invalid_api_key")
    assert "forward keys only" in decision.error.message
    assert decide(STRICT, ALICE.key).use_pool


@pytest.mark.parametrize("credential", [None, OWN, f"{OWN}:pk-wrong", f"{ALICE.key}:pk-wrong", "pk-wrong"])
def test_a_missing_or_wrong_proxy_key_is_401(credential):
    refused_with(decide(GUARDED, credential, PROXY_KEYS), 401, "invalid_proxy_key")


def test_a_proxy_key_with_a_forward_key_uses_the_pool():
    decision = decide(GUARDED, f"{ALICE.key}:pk-one-1111", PROXY_KEYS)
    assert decision.use_pool and decision.forward_key == ALICE


def test_a_proxy_key_with_a_clients_own_key_passes_the_stripped_key():
    decision = decide(GUARDED, f"{OWN}:pk-two-2222", PROXY_KEYS)
    assert decision.client_key == OWN and not decision.use_pool


def test_a_bare_proxy_key_in_no_auth_mode_uses_the_pool():
    assert decide(NO_AUTH, "pk-one-1111", PROXY_KEYS).use_pool


def test_a_bare_proxy_key_on_a_guarded_route_still_needs_a_forward_key():
    refused_with(decide(GUARDED, "pk-one-1111", PROXY_KEYS), 401, "missing_api_key")


# The model a request asks for -------------------------------------------------------------------------------

JSON_TYPE = b"application/json"


def multipart(*parts, boundary=b"----fwdBoundary7MA4YWxk"):
    """A multipart/form-data body of (name, value, filename) parts, and its Content-Type."""
    body = b""
    for name, value, filename in parts:
        disposition = b'form-data; name="%s"' % name
        if filename:
            disposition += b'; filename="%s"' % filename
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        if filename:
            body += b"Content-Type: application/octet-stream\r\n"
        body += b"\r\n" + value + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return body, b"multipart/form-data; boundary=" + boundary


# Paths and routes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../x",
        b"/v1/..",
        b"/v1/./x",
        b"/v1/%2e%2e/x",
        b"/v1/%2E./x",
        b"/v1/..%2fx",
        b"/v1/..%2Fx",
        b"/v1/..\\x",
        b"/v1/%5c..%5cx",
        b"/openai/%2e%2e/%2e%2e/admin",
    ],
)
def test_a_path_with_dot_segments_plain_or_encoded_is_caught(path):
    assert escapes(path)


@pytest.mark.parametrize(
    "path", [b"/v1/files/a.jsonl", b"/v1/x..y", b"/v1/chat/completions", b"/v1/a%20b", b"/v1/...", b"/"]
)
def test_ordinary_paths_pass(path):
    assert not escapes(path)


def test_the_upstream_host_header_names_the_host_and_only_a_non_default_port():
    from fwd.gateway import host_header

    assert host_header("https://api.openai.com") == b"api.openai.com"
    assert host_header("https://x.openai.azure.com:443/") == b"x.openai.azure.com"
    assert host_header("http://127.0.0.1:8080/v1") == b"127.0.0.1:8080"
    assert host_header("http://[::1]:9000") == b"[::1]:9000"
    assert host_header("http://bücher.example:81") == b"xn--bcher-kva.example:81"
