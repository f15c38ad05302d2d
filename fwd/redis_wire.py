"""How commands are written to Redis: txredisapi's protocol with a one-pass encoder.  Imported only when
REDIS_URL is set (fwd.shared.connect).  Tests: tests/test_shared.py

txredisapi writes a command through `_build_command`, which passes each argument, and then its length, through
`_encode_value` (a chain of isinstance checks) into a bytearray: about 3 µs an argument under the profiler, and
an admission's EVALSHA has nine, its settlement as many again.  `ScriptProtocol` overrides that one method
(txredisapi has no public hook for it) for the commands this project sends, strings, bytes and whole numbers,
and leaves any other to txredisapi.  The bytes are the same (tests/test_shared.py compares them, and fails if
txredisapi stops building its commands there).
"""

from __future__ import annotations

import txredisapi


def encode_command(args: tuple) -> bytes:
    """A command in Redis's protocol (RESP): an array of bulk strings.  TypeError for an argument that is not a
    str, bytes or int (txredisapi has its own rules for those)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        if kind is str:
            arg = arg.encode()
        elif kind is int:
            arg = b"%d" % arg
        elif kind is not bytes:
            raise TypeError(kind.__name__)
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class ScriptProtocol(txredisapi.RedisProtocol):
    """txredisapi's protocol (hiredis when it is there), writing its commands with `encode_command`."""

    def _build_command(self, *args, **kwargs):
        if self.charset == "utf-8":
            try:
                return encode_command(args)
            except (TypeError, UnicodeEncodeError):
                pass
        return super()._build_command(*args, **kwargs)
