"""The iterative JSON parser behind the deep-record fallback (workers/jsonscan.py): it accepts exactly
what msgspec accepts, at any depth, and its spans cut out the very bytes of each value."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conflux.workers import jsonscan

FUZZ = settings(max_examples=300, derandomize=True, deadline=None)

scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=4), max_leaves=20)
JSONISH = st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b",", b":", b" ", b'"', b"\\", b"a", b"1", b"-", b".",
                                    b"e", b"0", b"true", b"null", b'"k"', b"\\u00e9", b"\n", b"\x01"]),
                   max_size=24).map(b"".join)


def msgspec_accepts(body: bytes) -> bool:
    try:
        msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def jsonscan_accepts(body: bytes) -> bool:
    try:
        jsonscan.parse(body, 3)
    except ValueError:
        return False
    return True


def pretty(value: Any) -> bytes:
    """Encoded with the whitespace a server may put anywhere between tokens."""
    return msgspec.json.format(msgspec.json.encode(value), indent=2)


def check_spans(body: bytes, node: jsonscan.Node, value: Any) -> None:
    assert msgspec.json.decode(body[node.start:node.end]) == value
    if node.children is None:
        return
    if isinstance(value, list):
        assert [name for name, _child in node.children] == [None] * len(value)
        for (_name, child), item in zip(node.children, value, strict=True):
            check_spans(body, child, item)
    else:
        assert [name for name, _child in node.children] == list(value)
        for name, child in node.children:
            check_spans(body, child, value[name])


@FUZZ
@given(values, st.booleans())
def test_every_json_value_parses_and_each_span_is_its_value(value: Any, indented: bool) -> None:
    body = b" \n" + (pretty(value) if indented else msgspec.json.encode(value)) + b"\t"
    check_spans(body, jsonscan.parse(body, 3), value)


@FUZZ
@given(JSONISH)
@example(b"[1 2]")
@example(b'{"a":1,}')
@example(b"[01]")
@example(b"-")
@example(b"[1true]")
@example(b'"\\x"')
def test_it_accepts_exactly_what_msgspec_accepts(body: bytes) -> None:
    assert jsonscan_accepts(body) == msgspec_accepts(body), body


def test_depth_is_no_limit_and_deep_values_are_kept_as_spans() -> None:
    levels = 50_000
    body = b'{"a": [1, %s], "b": 2}' % (b"[" * levels + b"]" * levels)
    root = jsonscan.parse(body, 2)
    assert root.member("b").kind == b"" and body[root.member("b").start:root.member("b").end] == b"2"
    deep = root.member("a").children[1][1]
    assert deep.children is None and deep.end - deep.start == 2 * levels
    with pytest.raises(ValueError, match="not JSON"):
        jsonscan.parse(body[:-1], 2)


@pytest.mark.parametrize("body", [b"", b"  ", b"[1] [2]", b"\xff", b'["\xc3"]', b"{'a': 1}", b"NaN", b"[Infinity]"])
def test_what_is_not_one_json_value_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        jsonscan.parse(body, 1)
