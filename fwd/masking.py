"""Keys masked out of what an upstream sends back: an error body may quote the key it refused, and neither the
client nor a transcript may see a pool key.  Pure.  Tests: tests/test_masking.py"""

from __future__ import annotations

from fwd.settings import mask


class KeyMasker:
    """Replaces every occurrence of the given keys in a byte stream, however it is cut, by their masked form."""

    def __init__(self, keys: list[str]):
        self.keys = sorted({key.encode("latin-1") for key in keys if key}, key=len, reverse=True)
        self.masks = {key: mask(key.decode("latin-1")).encode("utf-8") for key in self.keys}
        self.keep = max((len(key) for key in self.keys), default=1) - 1
        self.carry = b""

    def _replace(self, data: bytes) -> bytes:
        for key in self.keys:
            if key in data:
                data = data.replace(key, self.masks[key])
        return data

    def feed(self, data: bytes) -> bytes:
        """The bytes that can go on now; the last few are held in case a key starts in them."""
        if not self.keys:
            return data
        data = self._replace(self.carry + data)
        if self.keep <= 0:
            self.carry = b""
            return data
        self.carry = data[-self.keep :]
        return data[: -self.keep] if len(data) > self.keep else b""

    def close(self) -> bytes:
        """What is still held, at the end of the stream."""
        rest, self.carry = self.carry, b""
        return self._replace(rest)

    def whole(self, data: bytes) -> bytes:
        """A complete body, masked."""
        return self._replace(data) if self.keys else data
