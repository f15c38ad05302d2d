"""The sockets of --workers: which ports each worker gets a socket of its own for, and how they are bound."""

from __future__ import annotations

import socket

import pytest

from fwd.listeners import StartupError, description_fields, sockets_per_worker


def test_description_fields_undo_twisteds_escapes():
    assert description_fields("tcp:8000:interface=\\:\\:1:backlog=64") == (["tcp", "8000"], {"interface": "::1",
                                                                                          "backlog": "64"})
    assert description_fields("ssl:port=8443:privateKey=a\\:b.pem") == (["ssl"], {"port": "8443",
                                                                                  "privateKey": "a:b.pem"})


def test_each_worker_gets_its_own_socket_on_the_one_port():
    sockets = sockets_per_worker("tcp:0:interface=127.0.0.1", 3)
    try:
        assert len(sockets) == 3
        ports = {s.getsockname() for s in sockets}
        assert len(ports) == 1 and next(iter(ports))[0] == "127.0.0.1", "all three listen on one address"
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets)
        port = sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the port answers
    finally:
        for s in sockets:
            s.close()


def test_an_ipv6_interface_is_bound_as_ipv6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        sockets = sockets_per_worker("tcp:0:interface=\\:\\:1", 2)
    except StartupError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert {s.family for s in sockets} == {socket.AF_INET6}
    finally:
        for s in sockets:
            s.close()


def test_other_ports_and_a_single_worker_share_one_socket(tmp_path):
    assert sockets_per_worker(f"unix:{tmp_path}/fwd.sock", 2) is None
    assert sockets_per_worker("systemd:domain=INET:index=0", 2) is None
    assert sockets_per_worker("tcp:0:interface=127.0.0.1", 1) is None


def test_a_port_in_use_is_one_line_and_leaves_nothing_bound():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(StartupError, match=f"cannot listen on tcp:{port}:interface=127.0.0.1: "):
            sockets_per_worker(f"tcp:{port}:interface=127.0.0.1", 2)
    finally:
        taken.close()
    again = sockets_per_worker(f"tcp:{port}:interface=127.0.0.1", 2)  # the failed attempt left nothing bound
    for s in again:
        s.close()


def test_a_port_another_instance_holds_is_an_error_not_a_silent_share():
    first = sockets_per_worker("tcp:0:interface=127.0.0.1", 2)
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(StartupError, match="cannot listen on"):
            sockets_per_worker(f"tcp:{port}:interface=127.0.0.1", 2)
    finally:
        for s in first:
            s.close()
