"""A strict reader of Content-Type parameters and multipart/form-data bodies.  Tests: tests/test_multipart.py

The model allow-list reads `model` (and `purpose`, and a batch file) from uploads, so it must see a form
exactly as any upstream server would.  Servers read forms differently: Go's mime/multipart and Werkzeug take a
bare LF or CR before a delimiter, Python's email package splits lines on either, busboy and Werkzeug ignore
`name = "x"` that Go and the email package read, each unescapes quoted-strings its own way, starlette decodes
names with the request's `charset`.  So this reader accepts one reading only, and refuses with MultipartError
every shape that some server might read another way:

- Content-Type: `multipart/form-data` with one `boundary` parameter and no other but `charset` (so
  `xboundary=`, `boundary*=` and a second boundary are refused), `charset` only when utf-8 or us-ascii
  (starlette decodes names in it: "+AG0-odel" is "model" in UTF-7).  The boundary is 1-70 RFC 2046 bchars,
  not dashes only, without spaces and without "boundary=" inside.
- Parameters are read per RFC 9110, names case-insensitive.  `parse_content_type` also tolerates spaces around
  "=", empty parameters and quoted-pairs, so such a value is never invisible; a form using any of them, or tabs
  or spaces before ";", is refused, as servers disagree on each.
- Body: every occurrence of "--" boundary is a delimiter: at the very start or after CRLF, followed by CRLF or,
  for the close delimiter, "--" then CRLF or the end.  No transport padding.  A preamble and an epilogue may
  hold anything but the boundary.
- Part headers: CRLF line ends only (no bare CR or LF), no obs-fold, token names right before ":", no control
  characters, no header twice, at most 32 lines and 16 KiB (1 MiB for all parts).  The disposition is
  `form-data; name=...` first, then `filename` and `filename*` at most, with no ";" inside a value, and a name
  neither empty nor holding an RFC 2047 encoded-word; RFC 2231 `name*` is refused, `filename*` is decoded.
  A part's `Content-Length`, when sent (OkHttp and treq send it), must match; nested multipart parts and a
  `_charset_` field are refused.
- Reading a field (`form_fields`, `form_part`, `field`): a name matches as the most forgiving server matches it
  (percent-decoded, NFKC, case-folded, before any "[", trimmed), so `Model`, `model[]`, `%6Dodel` or `ｍodel`
  beside or instead of `model` is refused.  A part read by `form_part` must not be transfer-encoded or have an
  empty filename, and a plain field must be untyped or text/plain in UTF-8 (busboy takes any other type for a
  file and decodes in the charset named).

`body` may be bytes or any object with `find(sub, start, end)` and slicing, such as an `mmap.mmap`; the body is
only searched, never copied.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import unquote, unquote_to_bytes

import attrs

MAX_HEADER_BYTES = 16 * 1024  # one part's header lines
MAX_HEADER_LINES = 32  # one part's header lines
MAX_FORM_HEADER_BYTES = 1024 * 1024  # all parts' header lines: bounds the work a form of tiny parts costs

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*)"'
_PARAMETER = re.compile(rf"([ \t]*);([ \t]*)(?:({_TOKEN})([ \t]*)=([ \t]*)(?:({_TOKEN})|{_QUOTED}))?")
_SPACE_TO_END = re.compile(r"[ \t]*\Z")
_MEDIA_TYPE = re.compile(rf"[ \t]*({_TOKEN})/({_TOKEN})")
_DISPOSITION_TYPE = re.compile(rf"[ \t]*({_TOKEN})")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_HEADER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t \x21-\x7e\x80-\xff]*\r\n")
_HEADER_BLOCK = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t \x21-\x7e\x80-\xff]*\r\n)*")
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}")
_EXT_VALUE = re.compile(r"(utf-8|iso-8859-1)'[0-9A-Za-z\-]*'((?:%[0-9A-Fa-f]{2}|[0-9A-Za-z!#$&+\-.^_`|~])*)", re.I)

_FORM_CHARSETS = frozenset({"utf-8", "us-ascii"})
_IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
_DISPOSITION_PARAMETERS = frozenset({"name", "filename", "filename*"})


class MultipartError(ValueError):
    """A form the proxy will not read: malformed, or open to more than one reading.  The message is client-safe."""


class Body(Protocol):
    """What the reader needs of a body: bytes, bytearray and mmap.mmap all qualify."""

    def find(self, sub: bytes, start: int, end: int = ..., /) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes: ...

    def __len__(self) -> int: ...


@attrs.frozen
class ContentType:
    """A media type, lower-cased, and its parameters by lower-cased name."""

    media_type: str
    params: dict[str, str]


@attrs.frozen
class Part:
    """One part of a form: field name, filename (None for a plain field), headers, and where its content lies."""

    name: str
    filename: str | None
    headers: tuple[tuple[str, str], ...]
    start: int
    end: int

    def value(self, body: Body) -> bytes:
        """The part's content, sliced from the body it was parsed from."""
        return body[self.start : self.end]

    def header(self, name: str) -> str | None:
        """The value of a header (lower-case name), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@attrs.frozen
class _Parameters:
    media: str
    pairs: tuple[tuple[str, str], ...]  # (lower-cased name, unescaped value), in order
    # Spaces around "=" or before ";", tabs, a quoted-pair or an empty parameter: read, but servers disagree.
    loose: bool


def _parameters(text: str, head: re.Pattern[str], what: str) -> _Parameters:
    """The head (media or disposition type) and parameters of a header value, per RFC 9110 section 5.6.6."""
    match = head.match(text)
    if match is None:
        raise MultipartError(f"{what} does not start with a valid type.")
    media = "/".join(match.groups()).lower()
    pairs = []
    seen = set()
    loose = False
    pos = match.end()
    while not _SPACE_TO_END.match(text, pos):
        param = _PARAMETER.match(text, pos)
        if param is None:
            raise MultipartError(f"{what} has a malformed parameter.")
        pos = param.end()
        space_before, space_after, name, before, after, token, quoted = param.groups()
        # Werkzeug and busboy read no tab there, multipart no space before ";", busboy no empty parameter.
        loose = loose or bool(space_before) or "\t" in space_after
        if name is None:
            loose = True
            continue
        name = name.lower()
        if name in seen:
            raise MultipartError(f"{what} repeats the parameter {name[:40]!r}.")
        seen.add(name)
        loose = loose or bool(before or after)
        if quoted is not None and "\\" in quoted:
            loose = True
            quoted = _QUOTED_PAIR.sub(r"\1", quoted)
        pairs.append((name, token if token is not None else quoted))
    return _Parameters(media, tuple(pairs), loose)


def parse_content_type(value: bytes) -> ContentType:
    """A Content-Type read per RFC 9110: spaces around "=" tolerated, quoted-pairs unescaped, duplicates refused."""
    parsed = _parameters(value.decode("latin-1"), _MEDIA_TYPE, "Content-Type")
    return ContentType(parsed.media, dict(parsed.pairs))


def form_boundary(content_type: bytes) -> bytes:
    """The boundary of a multipart/form-data Content-Type that every server reads the same way."""
    parsed = _parameters(content_type.decode("latin-1"), _MEDIA_TYPE, "Content-Type")
    if parsed.media != "multipart/form-data":
        raise MultipartError("Content-Type is not multipart/form-data.")
    if parsed.loose:
        raise MultipartError("Content-Type parameters must be name=value, with no spaces around '=' and no escapes.")
    params = dict(parsed.pairs)
    boundary = params.get("boundary")
    if boundary is None:
        raise MultipartError("Content-Type has no boundary parameter.")
    # With no other parameter (xboundary, boundary*) and no repeat, only the value could hide a second boundary
    # from a parser that splits on "boundary=".  Chrome's boundaries hold the word: "----WebKitFormBoundary...".
    if set(params) - {"boundary", "charset"}:
        raise MultipartError("A multipart/form-data Content-Type takes only the parameters boundary and charset.")
    if "boundary=" in boundary.lower():
        raise MultipartError("The multipart boundary must not itself hold 'boundary='.")
    if params.get("charset", "utf-8").lower() not in _FORM_CHARSETS:
        raise MultipartError("A multipart/form-data body must be UTF-8.")
    if boundary.strip("-") == "":
        # "--" and a run of dashes overlaps itself: its close delimiter holds the boundary again.
        raise MultipartError("The multipart boundary must not be dashes only.")
    if not _BOUNDARY.fullmatch(boundary):
        raise MultipartError("The multipart boundary must be 1 to 70 letters, digits or '()+_,-./:=? without spaces.")
    return boundary.encode("ascii")


def parse_form(body: Body, content_type: bytes, *, max_parts: int = 1000) -> list[Part]:
    """The parts of a multipart/form-data body, or MultipartError when any server could read it another way."""
    dash = b"--" + form_boundary(content_type)
    pos = body.find(dash, 0)
    if pos < 0:
        raise MultipartError("The multipart body has no delimiter line for its boundary.")
    _check_line_start(body, pos)
    parts: list[Part] = []
    header_bytes = 0
    while True:
        after = pos + len(dash)
        tail = body[after : after + 2]
        if tail == b"--":
            break
        if tail != b"\r\n":
            raise MultipartError("A multipart delimiter must be followed by CRLF or '--', with no padding.")
        following = body.find(dash, pos + 1)
        if following < 0:
            raise MultipartError("The multipart body has no closing delimiter.")
        _check_line_start(body, following)
        if following - 2 < after + 2:
            raise MultipartError("The multipart body has a malformed delimiter line.")
        if len(parts) == max_parts:
            raise MultipartError(f"The form has more than {max_parts} parts.")
        parts.append(_part(body, after + 2, following - 2))
        header_bytes += parts[-1].start - after
        if header_bytes > MAX_FORM_HEADER_BYTES:
            raise MultipartError(f"The form's part headers exceed {MAX_FORM_HEADER_BYTES} bytes in all.")
        pos = following
    end = after + 2
    if end < len(body) and body[end : end + 2] != b"\r\n":
        raise MultipartError("The closing delimiter must end its line, with no padding.")
    if body.find(dash, pos + 1) >= 0:
        raise MultipartError("The multipart boundary appears after the closing delimiter.")
    if any(_loose(part.name) == "_charset_" for part in parts):
        raise MultipartError("A _charset_ field changes how servers decode the form; it is not accepted.")
    return parts


def _check_line_start(body: Body, pos: int) -> None:
    """The boundary at pos opens the body or follows CRLF: a bare LF or CR before it would be a delimiter to some."""
    if pos != 0 and (pos < 2 or body[pos - 2 : pos] != b"\r\n"):
        raise MultipartError(
            "The multipart boundary appears where it is not a delimiter (after a bare LF or CR, or mid-line)."
        )


def _part(body: Body, start: int, end: int) -> Part:
    """One part between its delimiter line (ending at start) and the CRLF before the next delimiter (at end)."""
    limit = min(end, start + MAX_HEADER_BYTES + 4)
    blank = body.find(b"\r\n\r\n", start - 2, limit)
    if blank < 0:
        if limit < end:
            raise MultipartError(f"A part's headers exceed {MAX_HEADER_BYTES} bytes.")
        raise MultipartError("A part has no empty line after its headers.")
    headers = _headers(body[start:blank] if blank > start else b"")
    fields = dict(headers)
    disposition = fields.get("content-disposition")
    if disposition is None:
        raise MultipartError("A part has no Content-Disposition header.")
    name, filename = _disposition(disposition)
    content_start = blank + 4
    if "content-type" in fields:
        media = _parameters(fields["content-type"], _MEDIA_TYPE, "A part's Content-Type").media
        if media.startswith("multipart/"):
            raise MultipartError("Nested multipart parts are not accepted.")
    length = fields.get("content-length")
    if length is not None and (not length.isdigit() or int(length) != end - content_start):
        raise MultipartError("A part's Content-Length does not match its content.")
    return Part(name, filename, headers, content_start, end)


def _headers(block: bytes) -> tuple[tuple[str, str], ...]:
    """Part header lines: CRLF-separated, each a token, ":", and a value of visible characters, spaces and tabs."""
    lines = block + b"\r\n" if block else b""
    if not _HEADER_BLOCK.fullmatch(lines):
        _refuse_header_line(block)
    if lines.count(b"\r\n") > MAX_HEADER_LINES:
        raise MultipartError(f"A part has more than {MAX_HEADER_LINES} headers.")
    headers = []
    for line in block.split(b"\r\n") if block else ():
        name, _, value = line.partition(b":")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1").strip(" \t")))
    if len({name for name, _ in headers}) != len(headers):
        raise MultipartError("A part repeats a header.")
    return tuple(headers)


def _refuse_header_line(block: bytes) -> None:
    """Say which rule the first bad line of a header block breaks."""
    for line in block.split(b"\r\n"):
        if not _HEADER_LINE.fullmatch(line + b"\r\n"):
            if line[:1] in (b" ", b"\t"):
                raise MultipartError("A part header is folded over lines (obs-fold); that is not accepted.")
            if b"\r" in line or b"\n" in line:
                raise MultipartError("Part headers must end lines with CRLF, not a bare CR or LF.")
            break
    raise MultipartError("A part header is malformed or holds control characters.")


def _disposition(value: str) -> tuple[str, str | None]:
    """The field name and filename of `form-data; name="..."[; filename="..."][; filename*=...]`."""
    parsed = _parameters(value, _DISPOSITION_TYPE, "Content-Disposition")
    if parsed.media != "form-data":
        raise MultipartError("A part's Content-Disposition is not form-data.")
    if parsed.loose:
        raise MultipartError(
            "Content-Disposition parameters must be name=value, with no spaces around '=' and no escapes."
        )
    names = [name for name, _ in parsed.pairs]
    if not names or names[0] != "name":
        raise MultipartError("A part's Content-Disposition must start with its name parameter.")
    if not set(names) <= _DISPOSITION_PARAMETERS:
        raise MultipartError("A part's Content-Disposition takes only name, filename and filename*.")
    params = dict(parsed.pairs)
    if any(";" in value for value in params.values()):
        raise MultipartError("A Content-Disposition value holds ';', which some servers split on.")
    try:
        name = params["name"].encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise MultipartError("A field name is not UTF-8.") from None
    if not name:
        raise MultipartError("A part has an empty name.")  # Go skips such a part, busboy gives it no name.
    if "=?" in name:
        # The email package's default policy decodes RFC 2047 encoded-words even inside quotes.
        raise MultipartError("A field name holds an RFC 2047 encoded-word; that is not accepted.")
    filename = params.get("filename")
    if filename is not None:
        try:
            filename = filename.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            pass  # Kept as Latin-1: a filename only tells a file from a field.
    if "filename*" in params:
        extended = _ext_value(params["filename*"])
        filename = extended if filename is None else filename
    return name, filename


def _ext_value(value: str) -> str:
    """An RFC 8187 ext-value (charset'language'percent-encoded), in UTF-8 or ISO-8859-1."""
    match = _EXT_VALUE.fullmatch(value)
    if match is None:
        raise MultipartError("A filename* parameter is malformed.")
    if not match.group(2):
        raise MultipartError("A filename* parameter is empty.")  # Go then takes the part for a field.
    try:
        return unquote_to_bytes(match.group(2)).decode(match.group(1).lower())
    except UnicodeDecodeError:
        raise MultipartError("A filename* parameter does not decode in its charset.") from None


def _loose(name: str) -> str:
    """A field name as the most forgiving server matches it: percent-decoded, NFKC, case-folded, before "[", trimmed."""
    return unicodedata.normalize("NFKC", unquote(name)).casefold().split("[", 1)[0].strip()


def _spelled_alike(parts: Sequence[Part], name: str) -> list[Part]:
    """Parts whose name a forgiving server takes for `name`; MultipartError when any is not spelled exactly so."""
    key = _loose(name)
    alike = [part for part in parts if _loose(part.name) == key]
    if any(part.name != name for part in alike):
        raise MultipartError(f"The form has a field named like '{name}' but not exactly '{name}'.")
    return alike


def form_fields(parts: Sequence[Part], body: Body, name: str) -> list[bytes]:
    """Every value sent under this exact field name; MultipartError when another part's name is a variant of it."""
    return [part.value(body) for part in _spelled_alike(parts, name)]


def form_part(parts: Sequence[Part], name: str) -> Part | None:
    """The one part named `name`, None when absent; MultipartError when repeated, misspelled or transfer-encoded."""
    alike = _spelled_alike(parts, name)
    if not alike:
        return None
    if len(alike) > 1:
        raise MultipartError(f"The form sends '{name}' more than once.")
    part = alike[0]
    encoding = part.header("content-transfer-encoding")
    if encoding is not None and encoding.lower() not in _IDENTITY_ENCODINGS:
        raise MultipartError(f"The '{name}' part is transfer-encoded; send it as plain bytes.")
    if part.filename == "":
        raise MultipartError(f"The '{name}' part has an empty filename: servers disagree whether it is a file.")
    media = part.header("content-type")
    if part.filename is None and media is not None:
        # Some servers take a typed part for a file, or decode it in the charset it names.
        content_type = parse_content_type(media.encode("latin-1"))
        charset = content_type.params.get("charset", "utf-8").lower()
        if content_type.media_type != "text/plain" or charset not in _FORM_CHARSETS:
            raise MultipartError(f"The '{name}' field must be plain UTF-8 text.")
    return part


def field(parts: Sequence[Part], body: Body, name: str, *, max_length: int = 4096) -> str | None:
    """The text of a single plain field, strict UTF-8; None when absent, MultipartError when ambiguous or a file."""
    part = form_part(parts, name)
    if part is None:
        return None
    if part.filename is not None:
        raise MultipartError(f"The '{name}' field is sent as a file.")
    if part.end - part.start > max_length:
        raise MultipartError(f"The '{name}' field is longer than {max_length} bytes.")
    try:
        return part.value(body).decode("utf-8")
    except UnicodeDecodeError:
        raise MultipartError(f"The '{name}' field is not UTF-8.") from None

