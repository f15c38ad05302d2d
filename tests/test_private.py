"""The private Twisted names the daemon relies on (fwd/private.py) are all there: an upgrade of Twisted that
drops one fails here, loudly, instead of silently turning off what it was for."""

from twisted.web import http

import twisted
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
    import ast
    import pathlib

    import twisted.web.client
    import twisted.web.http

    privates = {name for module in (twisted.web.http, twisted.web.client) for name in vars(module) if name[:1] == "_"}
    privates |= {name for owner, name in private.REQUIRED if name[:1] == "_"}
    privates |= {name for owner, method, name in private.REQUIRED_INSTANCE if name[:1] == "_"}
    privates |= {"_http2", "_HTTPChannel__first_line", "_handlingRequest", "_disconnected", "_GenericHTTPChannelProtocol"}
    privates = {name for name in privates if not name.startswith("__")}
    package = pathlib.Path(private.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Attribute):
                names.append(node.attr)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                names += [alias.name for alias in node.names]
            offenders += [f"{path.relative_to(package)}: {name}" for name in names if name in privates]
    assert offenders == []
