"""An iterative JSON parser for the bodies msgspec cannot decode in one piece.

msgspec (like every recursive decoder) stops at Python's recursion limit, so one record nested about
1,000 levels deep failed the decode of its whole page. Run by the fetchers and the control process
only after that failure (``workers/batching.py``): this parser validates the whole body with an
explicit stack (any depth) and keeps the byte spans of the values down to ``keep_depth``, so the
page's records can be cut apart and the deep one set aside.

It is plain Python, so it lets regular expressions (in C) do the bulk: a value nested at most three
levels deep that nobody needs the inside of is matched whole, and so is a run of such members or
elements; Python only steps through deeper structure token by token.
"""

from __future__ import annotations

import re

import msgspec

_WS = rb"[ \t\n\r]*+"
_STRING = rb'"(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+"'
_SCALAR = rb"(?:" + _STRING + rb"|-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?[0-9]++)?+|true|false|null)"
_END_OF_WORD = rb"(?![0-9A-Za-z_.+-])"
_TOKEN = re.compile(_WS + rb"(?:(?P<open>[\[{])|(?P<close>[\]}])|(?P<comma>,)|(?P<colon>:)|(?P<string>" + _STRING
                    + rb")|(?P<scalar>" + _SCALAR + _END_OF_WORD + rb"))")
_WHITESPACE = re.compile(_WS)


def _shallow(inner: bytes) -> bytes:
    """A scalar, or an array or object of ``inner`` values."""
    member = _STRING + _WS + rb":" + _WS + inner
    array = rb"\[" + _WS + rb"(?:" + inner + rb"(?:" + _WS + rb"," + _WS + inner + rb")*+" + _WS + rb")?+\]"
    obj = rb"\{" + _WS + rb"(?:" + member + rb"(?:" + _WS + rb"," + _WS + member + rb")*+" + _WS + rb")?+\}"
    return rb"(?:" + _SCALAR + rb"|" + array + rb"|" + obj + rb")"


# A value nested at most three levels deep (most records), matched whole in C.
_VALUE = _shallow(_shallow(_shallow(_SCALAR)))
_WHOLE = re.compile(_VALUE)
_MEMBER = _WS + _STRING + _WS + rb":" + _WS + _VALUE
# One or more such members / elements, up to (not including) what follows the last one.
_OBJECT_RUN = re.compile(_MEMBER + rb"(?:" + _WS + rb"," + _MEMBER + rb")*+" + _END_OF_WORD)
_ARRAY_RUN = re.compile(_WS + _VALUE + rb"(?:" + _WS + rb"," + _WS + _VALUE + rb")*+" + _END_OF_WORD)

# What the innermost open container waits for next.
FIRST_VALUE, VALUE, FIRST_KEY, KEY, COLON, COMMA = range(6)
_RUNS = {FIRST_VALUE: _ARRAY_RUN, VALUE: _ARRAY_RUN, FIRST_KEY: _OBJECT_RUN, KEY: _OBJECT_RUN}


class Node:
    """A value's span in the body; ``children`` (members as (name, node), or elements as (None, node))
    only for containers above ``keep_depth``."""

    __slots__ = ("children", "end", "kind", "start")

    def __init__(self, kind: bytes, start: int, children: list | None) -> None:
        self.kind = kind          # b"{", b"[", or b"" for a scalar
        self.start = start
        self.end = start
        self.children = children

    def member(self, name: str) -> Node | None:
        """The value of member ``name`` (the last one, as msgspec reads duplicates), if kept."""
        for key, child in reversed(self.children or ()):
            if key == name:
                return child
        return None


class _Open:
    """A container being parsed: its kind, what comes next, the member name awaiting its value."""

    __slots__ = ("expect", "key", "kind", "node")

    def __init__(self, kind: bytes, node: Node | None) -> None:
        self.kind = kind
        self.node = node
        self.expect = FIRST_VALUE if kind == b"[" else FIRST_KEY
        self.key: str | None = None


class _Parser:
    def __init__(self, body: bytes, keep_depth: int) -> None:
        self.body = body
        self.keep_depth = keep_depth
        self.stack: list[_Open] = []
        self.root: Node | None = None
        self.done = False

    def run(self) -> Node:
        body, position, end = self.body, 0, len(self.body)
        while True:
            position = self.skip_run(position)
            match = _TOKEN.match(body, position)
            if match is None:
                break
            position = getattr(self, "on_" + match.lastgroup)(match) or match.end()
        position = _WHITESPACE.match(body, position).end()
        if not self.done or position != end:
            raise ValueError(f"not JSON: unexpected {'end' if position == end else 'byte'} at position {position}")
        return self.root

    def skip_run(self, position: int) -> int:
        """Past a run of scalar members or elements whose spans nobody keeps."""
        top = self.stack[-1] if self.stack else None
        if top is None or (top.node is not None and top.node.children is not None) or top.expect not in _RUNS:
            return position
        run = _RUNS[top.expect].match(self.body, position)
        if run is None:
            return position
        top.expect = COMMA
        return run.end()

    def fail(self, match: re.Match) -> None:
        raise ValueError(f"not JSON: unexpected {match.group(match.lastgroup)[:20]!r} at position "
                         f"{match.start(match.lastgroup)}")

    def begin_value(self, match: re.Match, kind: bytes) -> Node | None:
        """A value starts: check that one may, and make its node when it is shallow enough to keep."""
        top = self.stack[-1] if self.stack else None
        if self.done or (top is not None and top.expect not in (FIRST_VALUE, VALUE)):
            self.fail(match)
        depth = len(self.stack)
        if depth > self.keep_depth or (top is not None and top.node is None):
            return None
        node = Node(kind, match.start(match.lastgroup), [] if kind and depth < self.keep_depth else None)
        if top is None:
            self.root = node
        else:
            top.node.children.append((top.key, node))
        return node

    def end_value(self) -> None:
        if self.stack:
            self.stack[-1].expect = COMMA
        else:
            self.done = True

    def on_scalar(self, match: re.Match) -> None:
        node = self.begin_value(match, b"")
        if node is not None:
            node.end = match.end()
        self.end_value()

    def on_string(self, match: re.Match) -> None:
        top = self.stack[-1] if self.stack else None
        if top is None or top.expect not in (FIRST_KEY, KEY):
            self.on_scalar(match)
            return
        top.key = _decode_string(match.group("string")) if top.node is not None else None
        top.expect = COLON

    def on_open(self, match: re.Match) -> int | None:
        kind = match.group("open")
        node = self.begin_value(match, kind)
        if node is None or node.children is None:  # nobody needs its inside: take it whole if it is shallow
            whole = _WHOLE.match(self.body, match.start("open"))
            if whole is not None:
                if node is not None:
                    node.end = whole.end()
                self.end_value()
                return whole.end()
        self.stack.append(_Open(kind, node))
        return None

    def on_close(self, match: re.Match) -> None:
        top = self.stack[-1] if self.stack else None
        closes = b"[" if match.group("close") == b"]" else b"{"
        if top is None or top.kind != closes or top.expect not in (FIRST_VALUE, FIRST_KEY, COMMA):
            self.fail(match)
        self.stack.pop()
        if top.node is not None:
            top.node.end = match.end()
        self.end_value()

    def on_comma(self, match: re.Match) -> None:
        top = self.stack[-1] if self.stack else None
        if top is None or top.expect != COMMA:
            self.fail(match)
        top.expect = KEY if top.kind == b"{" else VALUE

    def on_colon(self, match: re.Match) -> None:
        top = self.stack[-1] if self.stack else None
        if top is None or top.expect != COLON:
            self.fail(match)
        top.expect = VALUE


_decode_string = msgspec.json.Decoder(str).decode


def parse(body: bytes, keep_depth: int) -> Node:
    """The root of ``body``; ValueError when it is not one JSON value (or not UTF-8). Values at depth
    ``keep_depth`` or less (the root is 0) are kept as nodes; deeper ones are only checked."""
    body.decode("utf-8")  # UnicodeDecodeError is a ValueError
    return _Parser(body, keep_depth).run()
