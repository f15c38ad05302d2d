"""Reads a few top-level members of a JSON request body in bounded slices of work.  Tests: tests/test_jsonscan.py

The gateway needs `model`, `max_tokens` and a few more before it forwards a request. `json.loads` of a hostile
body (millions of tiny objects, deep nesting) holds the reactor for seconds and takes gigabytes, so a Scanner
walks the body without recursion, validating it as `json.loads(body.decode("utf-8"))` would, building nothing
but the requested values, and stops after about `budget` units of work per `step()`; the reactor runs it with
`twisted.internet.task.cooperate`. A unit is one byte examined (or one byte of a requested value decoded); a token
the scanner handles one at a time costs TOKEN_COST. UTF-8 validation runs ahead, a budget of bytes per step.

Malformed is what `json.loads(body.decode("utf-8"))` refuses: leading and trailing JSON whitespace are fine; a
UTF-8 byte order mark (as strict JSON parsers say: orjson, Go, serde), invalid UTF-8, trailing data and integers
longer than Python converts are not. NaN, Infinity and lone surrogate escapes pass, as json.loads lets them.
Nesting deeper than MAX_DEPTH is malformed wherever it is: json.loads gives up near Python's recursion limit,
less the caller's stack, and orjson at 1024.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from functools import lru_cache
from typing import Iterable

import attrs
import orjson

OBJECT = "object"
NOT_OBJECT = "not-object"
MALFORMED = "malformed"

MAX_VALUE = 16 * 1024
MAX_DEPTH = 512
BUDGET = 16 * 1024
TOKEN_COST = 32

_INT_DIGITS = sys.get_int_max_str_digits()


@attrs.frozen
class Members:
    """The requested top-level members of a JSON body, and what kind of JSON the body is: "object", "not-object"
    or "malformed"; only an object has members.

    A key names a member when it equals the name once unescaped and case-folded ("Model", "mod\\u0065l"), as an
    upstream matching keys leniently would read it. Each name present is in exactly one of: `values` (its one
    value, as json.loads decodes it), `duplicates` (it appears more than once: the upstream may honour either, so
    no value is given), `too_large` (its one value is longer than max_value bytes, and was not decoded).
    """

    kind: str
    values: dict = attrs.field(factory=dict)
    duplicates: frozenset = frozenset()
    too_large: frozenset = frozenset()


# The grammar, possessive throughout so that no failed match backtracks into a loop.
_WS_PATTERN = rb"[ \t\n\r]*+"
_STRING_BODY_PATTERN = rb'(?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+'
_STRING_PATTERN = rb'"' + _STRING_BODY_PATTERN + rb'"'
_NUMBER_PATTERN = rb"-?+(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][-+]?+[0-9]++)?+"
_LITERAL_PATTERN = rb"true|false|null|NaN|-?+Infinity"
# Inside skipped containers an integer part longer than json.loads converts is left to the token-level scan.
_SHORT_NUMBER_PATTERN = _NUMBER_PATTERN.replace(
    rb"[1-9][0-9]*+", rb"[1-9][0-9]{0,%d}+(?![0-9])" % (_INT_DIGITS - 1) if _INT_DIGITS else rb"[1-9][0-9]*+"
)
# Containers up to this many levels deep are validated by one regular expression, at C speed.
_LEVELS = 5


def _value_pattern(levels: int) -> bytes:
    """A JSON value nested at most `levels` deep: each element is followed by a comma and another, or the end."""
    scalar = _STRING_PATTERN + b"|" + _SHORT_NUMBER_PATTERN + b"|" + _LITERAL_PATTERN
    value = scalar
    for _ in range(levels):
        element = b"(?:" + value + b")" + _WS_PATTERN
        array = rb"\[" + _WS_PATTERN + b"(?:" + element + rb"(?:," + _WS_PATTERN + rb"(?!\])|(?=\])))*+\]"
        member = _STRING_PATTERN + _WS_PATTERN + b":" + _WS_PATTERN + element
        obj = rb"\{" + _WS_PATTERN + b"(?:" + member + rb"(?:," + _WS_PATTERN + rb"(?!\})|(?=\})))*+\}"
        value = _STRING_PATTERN + b"|" + obj + b"|" + array + b"|" + _SHORT_NUMBER_PATTERN + b"|" + _LITERAL_PATTERN
    return b"(?:" + value + b")"


_VALUE_PATTERN = _value_pattern(_LEVELS)


def _run_pattern(item: bytes, close: bytes) -> re.Pattern:
    """A run of whole items each followed by a comma, then maybe the last one (group 1) before `close`."""
    item += _WS_PATTERN
    return re.compile(b"(?:" + item + b"," + _WS_PATTERN + b")*+(?:(" + item + b")(?=" + close + b"))?+")


def _member_pattern(key: bytes, value: bytes) -> bytes:
    return key + _WS_PATTERN + b":" + _WS_PATTERN + value


# Compiled when the module is imported, not on a first request: it takes a few hundred milliseconds.
_ONE_VALUE = re.compile(_VALUE_PATTERN)
_ELEMENTS = _run_pattern(_VALUE_PATTERN, rb"\]")
_MEMBERS = _run_pattern(_member_pattern(_STRING_PATTERN, _VALUE_PATTERN), rb"\}")


# A chain of containers each opening inside the last (`[[{"a":[`), to be pushed at once; keys without brackets.
_OPENER = rb'(?:\[|\{' + _WS_PATTERN + rb'"[^"\\\x00-\x1f\[\]{}]*+"' + _WS_PATTERN + b":)"
_OPENERS = re.compile(_OPENER + b"(?:" + _WS_PATTERN + _OPENER + b")*+")
# A run of closing brackets, to be popped at once.
_CLOSERS = re.compile(rb"[\]}](?:" + _WS_PATTERN + rb"[\]}])*+")
_ALL_BYTES = bytes(range(256))
_NOT_OPENERS = _ALL_BYTES.translate(None, b"[{")
_NOT_CLOSERS = _ALL_BYTES.translate(None, b"]}")
_CLOSER_TO_OPENER = bytes.maketrans(b"]}", b"[{")
_CLOSER_OR_SPACE = frozenset(b"]} \t\n\r")
_SPACE = frozenset(b" \t\n\r")

_WS = re.compile(_WS_PATTERN)
_STRING = re.compile(_STRING_PATTERN)
_STRING_BODY = re.compile(_STRING_BODY_PATTERN)
_NUMBER = re.compile(_NUMBER_PATTERN)
_DIGITS = re.compile(rb"[0-9]*+")
_LITERALS = {ord(word[:1]): word for word in (b"true", b"false", b"null", b"NaN", b"Infinity")}

# Every character beyond ASCII whose case folding is all ASCII ("ſ" folds to "s", the Kelvin sign to "k"): a key
# spelled with one of them may be a requested name.
FOLDS_TO_ASCII = "\u00df\u017f\u1e9e\u212a\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06"
# Their UTF-8 (the ligatures share a prefix, with a few neighbours), and the escapes that spell them or any ASCII.
_FOLDS_TO_ASCII = (b"\xc3\x9f", b"\xc5\xbf", b"\xe1\xba\x9e", b"\xe2\x84\xaa", b"\xef\xac")
_ESCAPED_LETTER = re.compile(rb"\\u(?:00[0-7]|00[dD][fF]|017[fF]|1[eE]9[eE]|212[aA]|[fF][bB]0[0-6])")
# Names whose every spelling in a key, but for case, needs one of those.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]*")


@attrs.frozen(eq=False)
class _Names:
    """A set of requested names prepared once: their folded spellings, the longest key that can spell one, their
    quoted lower-case spellings (ASCII names only), and the run of top-level members that cannot be one."""

    folded: dict
    key_limit: int
    quoted: tuple | None
    top_members: re.Pattern

    @staticmethod
    @lru_cache(maxsize=64)
    def of(names: tuple) -> _Names:
        names = tuple(dict.fromkeys(names))
        folded: dict[str, tuple] = {}
        for name in names:
            folded[name.casefold()] = folded.get(name.casefold(), ()) + (name,)
        # A key folds to at least one character per character, each at most a pair of \u escapes: 12 bytes.
        key_limit = 2 + 12 * max((len(f) for f in folded), default=0)
        quoted = None
        if all(_PLAIN_NAME.fullmatch(name) for name in names):
            quoted = tuple((name, b'"' + name.lower().encode() + b'"') for name in names)
        ascii_names = b"|".join(re.escape(f.encode()) for f in sorted(folded, key=len, reverse=True) if f.isascii())
        unless = rb"(?!(?i:" + ascii_names + rb')")' if ascii_names else b""
        key = b'"' + unless + rb'[\x20\x21\x23-\x5b\x5d-\x7f]*+"'
        # Scalar values only: this is compiled per set of names, and the full grammar takes long to compile.
        scalar = b"(?:" + _STRING_PATTERN + b"|" + _SHORT_NUMBER_PATTERN + b"|" + _LITERAL_PATTERN + b")"
        return _Names(folded, key_limit, quoted, _run_pattern(_member_pattern(key, scalar), rb"\}"))


# What the scanner expects next.
_VALUE, _AFTER, _KEY, _COLON, _STRING_REST, _NUMBER_REST, _DONE = range(7)
# Parts of a number read piece by piece; the digit runs are the odd ones.
_SIGN, _INT, _AFTER_INT, _FRACTION, _AFTER_FRACTION, _EXPONENT, _END = range(7)
_OPEN_ARRAY, _OPEN_OBJECT, _CLOSE_ARRAY, _CLOSE_OBJECT, _COMMA, _COLON_BYTE, _QUOTE, _BACKSLASH = b'[{]},:"\\'
_MINUS, _DOT, _ZERO, _NINE, _SMALL_E, _CAPITAL_E = b"-.09eE"


class _Malformed(Exception):
    """The body is not JSON that json.loads accepts."""


class Scanner:
    """Finds the requested top-level members of a JSON body, about `budget` units of work per step()."""

    # The smallest stretch of body one action looks at, and the largest body read whole with orjson.
    min_window = 512
    fast_max = 16 * 1024

    def __init__(self, body: bytes, names: Iterable[str], max_value: int = MAX_VALUE) -> None:
        self.body = body
        self.max_value = max_value
        self.work = 0
        self._names = _Names.of(_names_tuple(names))
        self._small_tried = False
        self._result: Members | None = None
        self._pos = 0
        self._state = _VALUE
        self._stack = bytearray()
        self._may_close = False
        self._object = False
        # Where a run of whole elements last stopped short of its window: no use trying one there again.
        self._no_run_at = -1
        self._window = self.min_window
        self._member: tuple = ()
        self._start = 0
        self._after_string = _AFTER
        self._number = (0, _SIGN, 0)
        self._counts: dict[str, int] = {}
        self._spans: dict[str, tuple[int, int]] = {}
        self._values: dict[str, object] = {}
        self._too_large: set[str] = set()
        self._checked = 0
        self._spent = 0

    @property
    def least_budget(self) -> int:
        """The smallest budget a step keeps to: one action, whose window must hold any spelling of a requested key."""
        return max(self.min_window, self._names.key_limit) + TOKEN_COST

    @property
    def result(self) -> Members:
        """What the scan found; only once step() has returned True."""
        if self._result is None:
            raise RuntimeError("the scan is not finished")
        return self._result

    def step(self, budget: int = BUDGET) -> bool:
        """Scan on for at most max(budget, least_budget) units; True once the result is known.

        The one exception: a requested value longer than the budget is decoded in a step of its own."""
        if self._result is not None:
            return True
        try:
            if not self._small_tried:
                self._small_tried = True
                if self._small(budget):
                    self.work = len(self.body) + TOKEN_COST
                    self._result = _read_small(self.body, self._names)
                    return self._result is not None
            self._check_utf8(self._pos + budget)
            self._spent = 0
            self._scan(budget)
            if self._state == _DONE:
                self._finish(budget)
        except _Malformed:
            self._result = Members(MALFORMED)
        self.work += self._spent
        return self._result is not None

    def _small(self, budget: int) -> bool:
        """Whether this step may read the whole body with orjson: it is small, and so are all its values."""
        n = len(self.body)
        return n <= self.fast_max and n <= self.max_value and n + TOKEN_COST <= budget

    def _check_utf8(self, end: int) -> None:
        """Validate the body as strict UTF-8 up to about `end`, ahead of the scan, a few kilobytes at a time."""
        n = len(self.body)
        end = min(n, end)
        view = memoryview(self.body)
        while self._checked < end:
            stop = min(end, self._checked + 8192)
            try:
                used = codecs.utf_8_decode(view[self._checked : stop], "strict", stop == n)[1]
            except UnicodeDecodeError:
                raise _Malformed from None
            if not used:
                break  # a character cut at `end`: the next call reads it whole
            self._checked += used

    def _finish(self, budget: int) -> None:
        """Decode the values of members seen once while the budget allows (a value larger than the budget gets a
        step of its own); then the result is known."""
        self._check_utf8(len(self.body))
        if not self._object:
            self._result = Members(NOT_OBJECT)
            return
        while self._spans:
            name, (start, end) = next(iter(self._spans.items()))
            if end - start <= self.max_value:
                cost = end - start + TOKEN_COST
                if self._spent and self._spent + cost > budget:
                    return
                self._spent += cost
                try:
                    self._values[name] = _decode(self.body[start:end])
                except (RecursionError, ValueError):
                    # Nested deeper than json.loads manages from this stack, so it would refuse the whole body too.
                    # (A ValueError would be a scan that accepted what json.loads refuses: json.loads has the say.)
                    raise _Malformed from None
            else:
                self._too_large.add(name)
            del self._spans[name]
        duplicates = frozenset(name for name, count in self._counts.items() if count > 1)
        self._result = Members(OBJECT, self._values, duplicates, frozenset(self._too_large))

    def _scan(self, budget: int) -> None:
        """Advance until the budget is spent or the body is done, adding the units to self._spent."""
        body = self.body
        n = len(body)
        stack = self._stack
        pos = self._pos
        state = self._state
        spent = 0
        floor = self.least_budget - TOKEN_COST
        run_depth = MAX_DEPTH - _LEVELS
        try:
            while state != _DONE:
                # Each pass is one action of at most TOKEN_COST units plus a window of bytes.
                remaining = budget - spent - TOKEN_COST
                if remaining < floor:
                    if spent:
                        break
                    remaining = floor
                wend = pos + remaining if pos + remaining < n else n
                if state < _STRING_REST and pos < n and body[pos] in _SPACE:
                    skipped = _WS.match(body, pos, wend).end()
                    spent += skipped - pos
                    pos = skipped
                    if pos == wend < n:
                        continue
                spent += TOKEN_COST
                c = body[pos] if pos < n else -1
                depth = len(stack)

                if state == _VALUE:
                    if c == -1:
                        raise _Malformed
                    if depth == 0 and c == _OPEN_OBJECT:
                        self._object = True
                        stack.append(c)
                        pos += 1
                        state, self._may_close = _KEY, True
                        continue
                    if depth == 1 and self._object:
                        self._start = pos
                    if depth and stack[-1] == _OPEN_ARRAY and depth <= run_depth and self._no_run_at != pos:
                        match, cost = self._run(_ELEMENTS, pos, wend)
                        spent += cost
                        if match.end() > pos:
                            pos = match.end()
                            self._may_close = False
                            if match.start(1) >= 0:
                                state = _AFTER
                        continue
                    if c == _QUOTE:
                        match = _STRING.match(body, pos, wend)
                        if not match:
                            spent += wend - pos
                            pos += 1
                            state, self._after_string = _STRING_REST, _AFTER
                            continue
                        spent += match.end() - pos
                        pos = match.end()
                    elif c == _OPEN_ARRAY or c == _OPEN_OBJECT:
                        if depth <= 1 and self._no_run_at != pos:
                            # A top-level value or member: no run has tried it whole yet.
                            window = min(self._window, wend - pos)
                            match = _ONE_VALUE.match(body, pos, pos + window)
                            if match:
                                spent += match.end() - pos
                                pos = match.end()
                                state = self._value_done(pos)
                            else:
                                spent += window
                                self._window = self.min_window
                                self._no_run_at = pos
                            continue
                        start = pos
                        pos, state = self._open(pos, wend)
                        spent += pos - start
                        continue
                    elif c == _CLOSE_ARRAY and self._may_close:
                        stack.pop()
                        pos += 1
                    elif c == _MINUS or _ZERO <= c <= _NINE:
                        if body.startswith(b"-Infinity", pos):
                            pos += 9
                        else:
                            match = _NUMBER.match(body, pos, wend)
                            if not match or (match.end() == wend < n):
                                # It may go on past the window: read it piece by piece.
                                spent += wend - pos
                                self._number = (pos, _SIGN, 0)
                                state = _NUMBER_REST
                                continue
                            spent += match.end() - pos
                            _check_integer(body, pos, match.end())
                            pos = match.end()
                    elif c in _LITERALS and body.startswith(_LITERALS[c], pos):
                        pos += len(_LITERALS[c])
                    else:
                        raise _Malformed
                    state = self._value_done(pos)

                elif state == _AFTER:
                    if depth == 0:
                        if c != -1:
                            raise _Malformed
                        state = _DONE
                    elif c == _COMMA:
                        pos += 1
                        state = _VALUE if stack[-1] == _OPEN_ARRAY else _KEY
                        self._may_close = False
                    elif c == stack[-1] + 2:  # "]" follows "[", and "}" follows "{"
                        pos, examined = self._close(pos, wend)
                        spent += examined
                        state = self._value_done(pos)
                    else:
                        raise _Malformed

                elif state == _KEY:
                    if c == _CLOSE_OBJECT and self._may_close:
                        stack.pop()
                        pos += 1
                        state = self._value_done(pos)
                        continue
                    if c != _QUOTE:
                        raise _Malformed
                    if depth <= run_depth and self._no_run_at != pos:
                        match, cost = self._run(self._names.top_members if depth == 1 else _MEMBERS, pos, wend)
                        spent += cost
                        if match.end() > pos:
                            pos = match.end()
                            self._may_close = False
                            if match.start(1) >= 0:
                                state = _AFTER
                        continue
                    if depth == 1:
                        # Every spelling of a requested name fits in key_limit bytes, and so does the window.
                        wend = min(n, pos + self._names.key_limit)
                        match = _STRING.match(body, pos, wend)
                        self._member = self._requested(pos, match.end()) if match else ()
                    else:
                        match = _STRING.match(body, pos, wend)
                    if match:
                        spent += match.end() - pos
                        pos = match.end()
                        if pos < n and body[pos] == _COLON_BYTE:
                            pos += 1
                            state = _VALUE
                            self._may_close = False
                        else:
                            state = _COLON
                    else:
                        spent += wend - pos
                        pos += 1
                        state, self._after_string = _STRING_REST, _COLON

                elif state == _COLON:
                    if c != _COLON_BYTE:
                        raise _Malformed
                    pos += 1
                    state = _VALUE
                    self._may_close = False

                elif state == _STRING_REST:
                    end = _STRING_BODY.match(body, pos, wend).end()
                    spent += end - pos
                    pos = end
                    if pos < n and body[pos] == _QUOTE:
                        pos += 1
                        state = self._after_string
                        if state == _AFTER:
                            state = self._value_done(pos)
                    elif wend < n and (pos == wend or (body[pos] == _BACKSLASH and wend - pos < 6)):
                        continue  # the window ended inside the string, maybe inside an escape
                    else:
                        raise _Malformed

                elif state == _NUMBER_REST:
                    done, pos, cost = self._number_rest(pos, wend)
                    spent += cost
                    if done:
                        state = self._value_done(pos)
        finally:
            self._pos = pos
            self._state = state
            self._spent += spent

    def _run(self, pattern: re.Pattern, pos: int, wend: int) -> tuple[re.Match, int]:
        """Skip a run of whole elements or members at C speed, in a window that grows while runs fill it.

        The whole window counts as examined. A run that stops short of its window stopped at an item it cannot
        skip: that item is left to the tokens."""
        window = min(self._window, wend - pos)
        match = pattern.match(self.body, pos, pos + window)
        end = match.end()
        self._window = min(self._window * 2, 1 << 24) if (end - pos) * 2 >= window else self.min_window
        if end < pos + window or end == len(self.body):
            self._no_run_at = end
        return match, window

    def _open(self, pos: int, wend: int) -> tuple[int, int]:
        """Enter a chain of containers, each opening inside the last, at once; the position and state after it."""
        stack = self._stack
        match = _OPENERS.match(self.body, pos, wend)
        if match:
            end = match.end()
            stack += self.body[pos:end].translate(None, _NOT_OPENERS)
        else:  # "{" not followed by a plain key
            end = pos + 1
            stack.append(self.body[pos])
        if len(stack) > MAX_DEPTH:
            raise _Malformed
        # The chain ends just after "[" (the array may be empty) or after a key's ":" (a value must follow).
        self._may_close = self.body[end - 1] != _COLON_BYTE
        return end, (_KEY if self.body[end - 1] == _OPEN_OBJECT else _VALUE)

    def _close(self, pos: int, wend: int) -> tuple[int, int]:
        """Leave the containers a run of closing brackets closes, at once when they match the open ones, but never
        the top-level one with others; the position after the last one left, and the bytes examined."""
        stack = self._stack
        body = self.body
        if pos + 1 < len(body) and body[pos + 1] in _CLOSER_OR_SPACE:
            end = _CLOSERS.match(body, pos, wend).end()
            examined = end - pos
            closers = body[pos:end].translate(None, _NOT_CLOSERS)
            if len(closers) >= len(stack) and len(closers) == examined:
                # Closed without spaces down to the top-level container: all but that one.
                closers = closers[: len(stack) - 1]
                end = pos + len(closers)
            if 1 < len(closers) < len(stack) and stack.endswith(closers.translate(_CLOSER_TO_OPENER)[::-1]):
                del stack[-len(closers) :]
                return end, examined
        stack.pop()
        return pos + 1, 1

    def _value_done(self, pos: int) -> int:
        """A value ended at `pos`: if it is a requested top-level member's, count it; the next state."""
        if self._member and len(self._stack) == 1:
            for name in self._member:
                count = self._counts.get(name, 0) + 1
                self._counts[name] = count
                if count == 1:
                    self._spans[name] = (self._start, pos)
                else:
                    self._spans.pop(name, None)
            self._member = ()
        return _AFTER

    def _requested(self, start: int, end: int) -> tuple:
        """The requested names a top-level key (a whole string token) spells."""
        raw = self.body[start:end]
        try:
            key = json.loads(raw.decode("utf-8")) if b"\\" in raw else raw[1:-1].decode("utf-8")
        except ValueError:
            raise _Malformed from None
        return self._names.folded.get(key.casefold(), ())

    def _number_rest(self, pos: int, wend: int) -> tuple[bool, int, int]:
        """Read a number too long for one window, part by part: (done, position, units spent)."""
        body = self.body
        n = len(body)
        start, part, digits = self._number
        spent = 0
        while True:
            if part in (_INT, _FRACTION, _EXPONENT):
                end = _DIGITS.match(body, pos, wend).end()
                spent += end - pos
                digits += end - pos
                pos = end
                if pos == wend < n:
                    self._number = (start, part, digits)
                    return False, pos, spent
                part += 1
                continue
            c = body[pos] if pos < n else -1
            if part == _SIGN:
                if c == _MINUS:
                    pos += 1
                    c = body[pos] if pos < n else -1
                if c == _ZERO:
                    pos, part, digits = pos + 1, _AFTER_INT, 1
                elif _ZERO < c <= _NINE:
                    part, digits = _INT, 0
                else:
                    raise _Malformed
            elif part == _AFTER_INT and c == _DOT:
                pos = _digit_follows(body, pos + 1)
                part = _FRACTION
            elif part in (_AFTER_INT, _AFTER_FRACTION) and (c == _SMALL_E or c == _CAPITAL_E):
                pos = _digit_follows(body, pos + 2 if pos + 1 < n and body[pos + 1] in b"+-" else pos + 1)
                part = _EXPONENT
            else:
                if part == _AFTER_INT and _INT_DIGITS and digits > _INT_DIGITS:
                    raise _Malformed
                return True, pos, spent


def _digit_follows(body: bytes, pos: int) -> int:
    """`pos`, where a number's fraction or exponent must have a digit."""
    if not (pos < len(body) and _ZERO <= body[pos] <= _NINE):
        raise _Malformed
    return pos


def _check_integer(body: bytes, start: int, end: int) -> None:
    """Refuse an integer with more digits than json.loads converts (a float may have any number)."""
    if _INT_DIGITS and end - start > _INT_DIGITS:
        if all(body.find(mark, start, end) < 0 for mark in (b".", b"e", b"E")):
            if end - start - (body[start] == _MINUS) > _INT_DIGITS:
                raise _Malformed


def _read_small(body: bytes, names: _Names) -> Members | None:
    """A small body read whole with orjson; None when the scanner must decide (orjson refused it, or a
    requested name may be duplicated or spelled differently)."""
    if names.quoted is None:
        return None
    if len(body) > 2 * MAX_DEPTH and body.count(b"[") + body.count(b"{") > MAX_DEPTH:
        return None  # the depth limit is the scanner's to judge, whatever orjson's version says
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict:
        return Members(NOT_OBJECT)
    if _ESCAPED_LETTER.search(body) or (not body.isascii() and any(utf8 in body for utf8 in _FOLDS_TO_ASCII)):
        return None
    lowered = body.lower()
    values = {}
    for name, spelling in names.quoted:
        # Without those escapes and letters, every key that folds to the name is this spelling, lower-cased (an
        # escaped quote may add a count, never hide one).
        count = lowered.count(spelling)
        if count:
            if count > 1 or name not in doc:
                return None
            value = doc[name]
            if type(value) not in _SIMPLE and not _exact(value):
                return None
            values[name] = value
    return Members(OBJECT, values)


_SIMPLE = frozenset({str, int, bool, type(None)})


def _decode(text: bytes) -> object:
    """A JSON value as json.loads gives it: by orjson where that is the same thing (faster, and no recursion)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text.decode("utf-8"))
    if type(value) in _SIMPLE or _exact(value):
        return value
    return json.loads(text.decode("utf-8"))


def _exact(value: object) -> bool:
    """Whether orjson's value is what json.loads gives: orjson reads integers past 64 bits as floats."""
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is float:
            return False
        if kind is dict:
            pending.extend(item.values())
        elif kind is list:
            pending.extend(item)
    return True


def scan(body: bytes, names: Iterable[str], max_value: int = MAX_VALUE) -> Members:
    """The requested top-level members of a JSON body, scanned to the end at once (small bodies, tests)."""
    if len(body) <= Scanner.fast_max and len(body) <= max_value:
        result = _read_small(body, _Names.of(_names_tuple(names)))
        if result is not None:
            return result
    scanner = Scanner(body, names, max_value)
    scanner._small_tried = True
    while not scanner.step(1 << 62):
        pass
    return scanner.result


def _names_tuple(names: Iterable[str]) -> tuple:
    if isinstance(names, (str, bytes)):
        raise TypeError("names must be an iterable of member names, not one string")
    return names if type(names) is tuple else tuple(names)
