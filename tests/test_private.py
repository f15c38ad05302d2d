"""The private Twisted names the daemon relies on (fwd/private.py) are all there: an upgrade of Twisted that
drops one fails here, loudly, instead of silently turning off what it was for."""

import twisted
from twisted.web import http

from fwd import private


def test_every_private_twisted_name_the_daemon_needs_is_still_there():
    gone = private.missing()
    assert gone == [], (
        f"Twisted {twisted.__version__} no longer has {', '.join(gone)}: fwd/private.py says what each is for; "
        "find the new way before upgrading"
    )


def test_a_name_that_disappears_is_reported(monkeypatch):
    monkeypatch.delattr(http.HTTPChannel, "_respondToBadRequestAndDisconnect")
    assert "HTTPChannel._respondToBadRequestAndDisconnect" in private.missing()


def test_no_other_module_of_the_package_touches_a_private_twisted_name():
    import pathlib
    import re

    package = pathlib.Path(private.__file__).parent
    pattern = re.compile(
        r"_HTTPChannel__|_GenericHTTPChannelProtocol|_sslContextFactory|_HTTP11ClientFactory|_requestWithEndpoint"
        r"|_getEndpoint|_raiseSynchronously|_handlingRequest|\._disconnected|\._channel\b|\bpool\._factory|_http2\b"
    )
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name not in ("private.py", "http2.py") and pattern.search(path.read_text())
    ]
    assert offenders == []
