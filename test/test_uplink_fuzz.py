"""Fuzzing the ingest server's request checks: what a request names and the token it carries.

The library tier: :func:`~bms_ai.uplink.ingest_server.segment_name` (a name becomes a file under the store)
and :func:`~bms_ai.uplink.ingest_server.bearer_ok` (exactly the configured token), BMS_AI_FUZZ_CASES (340)
cases each.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bms_ai.uplink.ingest_server import bearer_ok, segment_name

FAST_CASES = int(os.environ.get("BMS_AI_FUZZ_CASES", "340"))  # per target
HEX64 = re.compile(r"[0-9a-f]{64}")
SETTINGS = {"deadline": None, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                      HealthCheck.large_base_example]}

# ----------------------------------------------------------------------------- library tier


def rare(draw, one_in: int = 10) -> bool:
    """True about once in ``one_in`` draws."""
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def names(draw) -> str:
    """What a request may name as a segment: 64 hex digits with odd things around or inside them, or anything."""
    size = 64 if not rare(draw, 4) else draw(st.integers(60, 68))
    hexes = draw(st.text("0123456789abcdefABCDEF", min_size=size, max_size=size))
    odd = draw(st.sampled_from(["\n", "\r\n", "\x00", "/", "..", "../", "%2e", " ", "\t", "\u0661", "\uff10",
                                "\u212a", "\u0130", "\udcff", "a"]) | st.text(min_size=1, max_size=3))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.text(max_size=80))
    if kind == 1:
        return hexes + odd
    if kind == 2:
        return odd + hexes
    at = draw(st.integers(0, len(hexes)))
    return hexes[:at] + odd + hexes[at:]


@settings(max_examples=FAST_CASES, **SETTINGS)
@given(name=names())
@example(name="0" * 64 + "\n")  # found by this test: "$" in the pattern let a trailing line break through
def test_segment_names_never_leave_the_store(name: str) -> None:
    """A name passes only as exactly 64 hex digits (lower-cased), so it is one file directly in objects/."""
    got = segment_name(name)
    exact = len(name) == 64 and all(c in string.hexdigits for c in name)
    assert (got is not None) == exact, (name, got)
    if got is not None:
        assert got == name.lower() and HEX64.fullmatch(got)
        objects = Path("/store/objects")
        assert (objects / got).parent == objects and (objects / f"{got}.json").parent == objects


@st.composite
def authorizations(draw) -> tuple[str, str]:
    """A configured token and an Authorization value as aiohttp hands it over (bytes as UTF-8, surrogateescape).

    The value is the right one with a few byte edits (or anything): the interesting cases are near misses.
    """
    token = draw(st.text(st.sampled_from("?=+/-._~") | st.characters(min_codepoint=33, max_codepoint=126),
                         min_size=1, max_size=16))
    value = bytearray(f"Bearer {token}".encode())
    byte = st.sampled_from([0x00, 0x09, 0x20, 0x3F, 0x41, 0x80, 0xC3, 0xE9, 0xEF, 0xFF])
    for _ in range(draw(st.integers(0, 3))):  # mostly in the token: the scheme's edits are plain mismatches
        anywhere = rare(draw, 4) or len(value) < 7
        pos = draw(st.integers(0, len(value))) if anywhere else 7 + draw(st.integers(0, len(value) - 7))
        op, b = draw(st.integers(0, 2)), draw(byte)
        if op == 0 and pos < len(value):
            value[pos] = b
        elif op == 1:
            value[pos:pos] = bytes([b])
        else:
            del value[pos:pos + 1]
    if draw(st.integers(0, 9)) == 0:
        value = bytearray(draw(st.binary(max_size=30)))
    return token, bytes(value).decode("utf-8", "surrogateescape").strip(" \t")


@settings(max_examples=FAST_CASES, **SETTINGS)
@given(case=authorizations())
@example(case=("0?", "Bearer 0\udc80"))  # found by this test: a byte aiohttp cannot decode matched a "?"
def test_bearer_token_only_the_exact_bytes(case: tuple[str, str]) -> None:
    """Accepted exactly when the header's bytes are ``Bearer <token>``; any other value is refused, never an error."""
    token, value = case
    exact = value.encode("utf-8", "surrogateescape") == f"Bearer {token}".encode()
    assert bearer_ok(value, token) == exact, (token, value)
    assert bearer_ok(value, "") and bearer_ok(None, "") and not bearer_ok(None, token)
