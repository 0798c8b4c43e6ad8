"""Fuzzing the ingest server's request parsing: hostile bytes get a 4xx or a closed connection, nothing else.

Two tiers. The library tier fuzzes the pure checks the server applies to what a
request names (:func:`~bms_ai.uplink.ingest_server.segment_name`,
:func:`~bms_ai.uplink.ingest_server.bearer_ok`). The ``e2e`` tier drives the
real server (its own process, address space limited, working directory in a
sandbox) over raw TCP on 127.0.0.1: random methods; targets with traversal,
percent-encoding, NUL, non-ASCII, very long; ``Content-Length`` negative, huge,
non-numeric, duplicated, off by some bytes; ``Transfer-Encoding: chunked`` with
bad chunk sizes; missing, wrong, duplicated and garbage ``Authorization``; huge
header lines and many headers; binary garbage before the request line;
pipelined, split, half-closed and truncated requests.

Every case: each answer is a 4xx (a 200/201 only for a valid request, an upload
only with the token and for the body sent) or the server closes, within
CASE_TIMEOUT_S; never a 5xx; every line of the server's log is one record and
none is a traceback or an internal error; no file appears outside the store,
nothing is stored that an authenticated request of the case did not send, no
partial body stays in ``tmp/``; a valid authenticated upload right after is
stored (201). The server's resident memory stays under RSS_LIMIT in every case
and grows by less than RSS_GROWTH over a run.

The default run is BMS_AI_FUZZ_CASES (340) cases per target; ``pytest -m slow
test/test_uplink_fuzz.py`` runs 50,000 per server target, 100,000 in all
(docs/uplink.md; results under reports/fuzz/).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import socket
import string
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from testutil import wait_for

from bms_ai.uplink.ingest_server import IngestServer, ServerStats, _OneLineLogger, bearer_ok, segment_name

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t0ken"
GOOD_AUTH = f"Bearer {TOKEN}".encode()
FAST_CASES = int(os.environ.get("BMS_AI_FUZZ_CASES", "340"))  # per target
SLOW_CASES = 50_000  # per server target: >= 100,000 in all
CASE_TIMEOUT_S = 10.0  # every answer (or the close) within this: a hang fails the case
RSS_LIMIT = 256 << 20  # the server's resident memory after any case
RSS_GROWTH = 48 << 20  # growth of the server's resident memory over a run, after the first tenth of it
AS_LIMIT = 2 << 30  # the server's address space (an unbounded allocation is a MemoryError, seen in its log)
MAX_BODY = 64 << 10  # the fuzzed server's body limit: declared lengths above it are refused (413)
CANARY = "bms-ai-fuzz-escape"  # the file name traversal targets aim at
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


@pytest.mark.drive   # ~1 s: outside the fast library tier
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


@pytest.mark.drive   # ~1 s: outside the fast library tier
@settings(max_examples=FAST_CASES, **SETTINGS)
@given(case=authorizations())
@example(case=("0?", "Bearer 0\udc80"))  # found by this test: a byte aiohttp cannot decode matched a "?"
def test_bearer_token_only_the_exact_bytes(case: tuple[str, str]) -> None:
    """Accepted exactly when the header's bytes are ``Bearer <token>``; any other value is refused, never an error."""
    token, value = case
    exact = value.encode("utf-8", "surrogateescape") == f"Bearer {token}".encode()
    assert bearer_ok(value, token) == exact, (token, value)
    assert bearer_ok(value, "") and bearer_ok(None, "") and not bearer_ok(None, token)


@pytest.mark.parametrize("text", ["%", "%s", "%d %s", "%(x)s", "100%", "P%sT / HTTP/1.1"])
def test_client_text_in_a_logged_error_is_logged_as_sent(text: str, caplog: pytest.LogCaptureFixture) -> None:
    """The parser's error quotes the client's bytes: a "%" there is text, not formatting (found by the server fuzz).

    It broke the log record: a "--- Logging error ---" traceback on stderr instead of the line.
    """
    caplog.set_level(logging.DEBUG, logger="bms_ai.ingest")
    stats = ServerStats()
    _OneLineLogger(stats).debug("bad request from %s", "127.0.0.1", exc_info=ValueError(f"Invalid method: b'{text}'\n ^"))
    _OneLineLogger(stats).error("Error handling request", exc_info=ValueError(text))
    assert [r.getMessage() for r in caplog.records] == [f"bad request from 127.0.0.1: ValueError: Invalid method: b'{text}' ^",
                                                        f"Error handling request: ValueError: {text}"]
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.WARNING] and stats.client_errors == 1


# ----------------------------------------------------------------------------- the server, over TCP

SERVER = """
import logging, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
from bms_ai.uplink.ingest_server import IngestServer, Limits
srv = IngestServer(sys.argv[1], sys.argv[2], limits=Limits(max_body={max_body}, header_timeout_s=0.05, read_timeout_s=0.05,
                                                         linger_s=0.05, queue_timeout_s=2))
print(srv.port, flush=True)
srv.serve_forever()
"""
LOG_LINE = re.compile(rb"(DEBUG|INFO) [\w.]+: ")  # one record per line; a WARNING or worse is a finding


@dataclass
class Server:
    """The fuzzed server process and what a case checks after it."""

    proc: subprocess.Popen
    port: int
    sandbox: Path  # its working directory: nothing may appear here but the store
    store: Path
    log: Path
    _log_at: int = 0
    _log_rest: bytes = b""
    statuses: collections.Counter = field(default_factory=collections.Counter)
    rss: list[int] = field(default_factory=list)

    def new_log_lines(self) -> list[bytes]:
        """Complete log lines written since the last call."""
        with open(self.log, "rb") as f:
            f.seek(self._log_at)
            data = f.read()
        self._log_at += len(data)
        *lines, self._log_rest = (self._log_rest + data).split(b"\n")
        return lines


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - yields the Server
    """The ingest server in its own process: address space limited, cwd a sandbox, debug log to a file."""
    base = tmp_path_factory.mktemp("ingest-fuzz")
    sandbox = base / "sandbox"
    store = sandbox / "a" / "b" / "store"
    store.mkdir(parents=True)
    log = base / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", SERVER.format(limit=AS_LIMIT, max_body=MAX_BODY),
                                 str(store), TOKEN], cwd=sandbox, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout is not None
    srv = Server(proc, int(proc.stdout.readline()), sandbox, store, log)
    yield srv
    proc.terminate()
    proc.communicate(timeout=10)
    text = log.read_bytes()
    assert b"Traceback" not in text, text[-3000:]


def short(data: bytes) -> str:
    """``data`` for a failure report: runs of one byte folded, so a case with a 70 kB header stays readable."""
    return " + ".join(f"{m.group(1)!r} * {len(m.group())}" if m.group(1) else repr(m.group())
                      for m in re.finditer(rb"(.)\1{15,}|(?:(.)(?!\2{15}))+", data, re.S)) or "b''"


@dataclass
class Request:
    """One request of a case, and what the oracle needs to know about it."""

    data: bytes
    head_only: bool  # HEAD: its answer has no body
    authorised: bool  # its first Authorization header is the right one
    payloads: tuple[bytes, ...]  # the body as sent, and as the chunks carry it

    def _repr_pretty_(self, p, cycle: bool) -> None:  # noqa: ANN001 - hypothesis prints a failing case with this
        p.text(repr(self))

    def __repr__(self) -> str:
        return f"Request({short(self.data)}, head_only={self.head_only}, authorised={self.authorised})"


@dataclass
class Case:
    """Bytes to send (in pieces) on one connection and the requests a reader of them would see."""

    pieces: list[bytes]
    requests: list[Request]
    half_close: bool = False

    def _repr_pretty_(self, p, cycle: bool) -> None:  # noqa: ANN001 - hypothesis prints a failing case with this
        p.text(repr(self))

    def __repr__(self) -> str:
        pieces = ", ".join(short(p) for p in self.pieces)
        return f"Case(pieces=[{pieces}], requests={self.requests}, half_close={self.half_close})"

    @property
    def allowed(self) -> set[str]:
        """Hashes the server may store after this case: bodies of authenticated requests only."""
        return {hashlib.sha256(p).hexdigest() for r in self.requests if r.authorised for p in r.payloads}


METHODS = [b"GET", b"PUT", b"PUT", b"PUT", b"POST", b"POST", b"HEAD"]
ODD_METHODS = [b"get", b"put", b"DELETE", b"OPTIONS", b"CONNECT", b"TRACE", b"PATCH", b"PRI", b"PUTT", b"P\x00T",
               b"GET\t", b"", b"PUT PUT", b"P" * 300]
VERSIONS = [b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/2", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 x", b"",
            b"HTTP/11", b"HTTP/1.1\x00", b"HTTP/1.1 ", b"HTTP/1.01"]
PREFIXES = ["/segments/", "/segments/", "/segments/", "/v1/segments/", "http://127.0.0.1/segments/"]
ODD_PREFIXES = ["//segments/", "/segments//", "/x/../segments/", "/segments/./", "/%73egments/", "/segments%2F",
                "/SEGMENTS/", "segments/"]
SUFFIXES = ["%0A", "%0a", "%0D%0A", "%00", "/", ".", "%2F", "/..", "?x=1", "#f", "%20", "%09", ";a", "%", "%zz",
            ".json", "/" + CANARY]
UPS = ["../", "%2e%2e/", "..%2f", "%2e%2e%2f", "%2E%2E%2F", "..%5c", "..\\", "....//", "%252e%252e%252f", ".%2e/",
       "..%c0%af", "%2e%2e%00/"]
MISC_TARGETS = ["/", "/healthz", "/healthz/", "/segments", "/segments/", "*", "", "/%", "/%zz", "/%00", "/a\x00b",
                "/%ff%fe", "?", "#", "//", "/healthz?%00", "/segments?x", "/segments/%2e%2e", "/healthz#x", "\\"]
#: the parts of a request a case may get wrong (each case gets a few wrong, often one); the body's framing, the
#: target and the token, where the server's own checks are, twice as often as the rest
FLAWS = ("method", "target", "target", "version", "eol", "host", "auth", "auth", "framing", "framing", "headers",
         "sep")


@st.composite
def targets(draw, method: bytes, sha: str) -> bytes:
    """A target the method is served at: upload paths for PUT and POST, health and listing for the rest."""
    if method == b"PUT":
        return (draw(st.sampled_from(PREFIXES)) + draw(st.sampled_from([sha, sha, sha.upper()]))).encode()
    if method == b"POST":
        return draw(st.sampled_from([b"/segments", b"/v1/segments", b"/segments/"]))
    return draw(st.sampled_from([b"/healthz", b"/segments", b"/", b"/segments/" + sha.encode()]))


@st.composite
def odd_targets(draw, sha: str, sandbox: str) -> bytes:
    """A bent upload name, traversal, an absolute path, odd, long or non-ASCII target, or binary."""
    kind = draw(st.integers(0, 7))
    if kind <= 1:
        name = draw(st.sampled_from([sha, sha, sha[:63], sha + "0", "".join(f"%{ord(c):02x}" for c in sha)]))
        prefix = draw(st.sampled_from(PREFIXES + ODD_PREFIXES))
        return (prefix + name + (draw(st.sampled_from(SUFFIXES)) if kind == 1 else "")).encode()
    if kind == 2:  # up and out, towards a canary name or the segment name
        ups = draw(st.sampled_from(UPS)) * draw(st.integers(1, 12))
        return f"/segments/{ups}{draw(st.sampled_from([CANARY, sha, 'x/' + CANARY]))}".encode()
    if kind == 3:  # an absolute path in the sandbox, in the ways a name might become one
        path = f"{sandbox}/abs/{CANARY}"
        form = draw(st.sampled_from([urllib.parse.quote(path, safe=""), "/" + path, urllib.parse.quote(path),
                                     path.replace("/", "%5c"), "%2F" + sha]))
        return f"/segments/{form}".encode()
    if kind == 4:
        return draw(st.sampled_from(MISC_TARGETS)).encode()
    if kind == 5:  # long: around the parser's line limit
        n = draw(st.sampled_from([100, 4000, 8150, 8170, 8190, 8200, 20000]))
        return draw(st.sampled_from([b"/", b"/segments/", b"/segments/" + b"../" * 10])) + b"a" * n
    if kind == 6:
        text = draw(st.text(max_size=30))
        return draw(st.sampled_from([b"/" + text.encode("utf-8", "surrogateescape"),
                                     ("/segments/" + urllib.parse.quote(text, errors="surrogateescape")).encode()]))
    return draw(st.binary(max_size=40))


@st.composite
def odd_lengths(draw, n: int) -> list[bytes]:
    """Content-Length values that are not simply the body's: none, off by some, negative, huge, not a number, two."""
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return []
    if kind == 1:
        return [str(max(0, n + draw(st.integers(-50, 50)))).encode()]
    if kind == 2:
        return [str(draw(st.integers(-(10**20), -1))).encode()]
    if kind == 3:
        return [str(draw(st.sampled_from([MAX_BODY, MAX_BODY + 1, 2**31, 2**32, 2**63, 10**30]))).encode()]
    if kind == 4:
        return [draw(st.sampled_from([b"", b"abc", b" 12 ", b"+5", b"0x10", b"1e3", b"1,2", "\u0661".encode(),
                                      b"12a", b"-0", b"00005", b"5 5", b"\t5", b"5\x00", b"\xff", b"0" * 100]))]
    if kind == 5:
        return [str(n).encode()] * 2
    if kind == 6:
        return draw(st.permutations([str(n).encode(), str(n + 1).encode()]))
    return [str(n).encode() + draw(st.sampled_from([b",", b", " + str(n).encode(), b";"]))]


ODD_AUTH = [b"Bearer wrong", b"Bearer", b"Bearer ", b"bearer t0ken", b"Basic dDBrZW4=", b"Bearer  t0ken",
            b"Bearer t0ken, Bearer x", b"Bearer t\xf6ken", b"Bearer t0ke", b"Bearer t0ken0", b"Bearer t0ken\x00",
            b"Bearer t0ken\xff", b"Bearer t?ken", b"Bearer \xc3\xbeken", b"Token t0ken", b"Bearer\tt0ken",
            b"Bearer " + b"x" * 9000, b"Bearer " + b"\x80" * 100]


@st.composite
def odd_authorizations(draw) -> list[bytes]:
    """Authorization values that are not the token: missing, wrong, near misses, duplicated, huge, binary."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return []
    if kind == 1:
        return [draw(st.sampled_from(ODD_AUTH))]
    if kind == 2:
        return draw(st.permutations([GOOD_AUTH, draw(st.sampled_from(ODD_AUTH))]))
    return [draw(st.binary(max_size=40))]


ODD_HEADERS = [(b"Expect", b"100-continue"), (b"Connection", b"close"), (b"Connection", b"keep-alive"),
               (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Upgrade", b"h2c"),
               (b"Content-Encoding", b"gzip"), (b"Content-Encoding", b"br"), (b"X-BMS-", b"empty name"),
               (b"X-BMS-sha256", b"0" * 64), (b"X-BMS-Size", b"-1"), (b"X-BMS-Vehicle", "\u00e9\u20ac".encode()),
               (b"X-BMS-Vehicle", b"\xff\xfe"), (b"X-BMS-Received", b"%s%n"), (b"Host", b"evil"), (b"Bad Name", b"x"),
               (b"", b"no name"), (b"X-Nul", b"a\x00b"), (b"X-Cr", b"a\rb"), (b" Folded", b"x"),
               (b"Content-Type", b"multipart/form-data; boundary=x"), (b"Transfer-Encoding", b"identity"),
               (b"X-Content-SHA256", b"zz")]
META_HEADERS = [(b"X-BMS-Class", b"raw"), (b"X-BMS-Vehicle", b"v1"), (b"X-BMS-Created", b"1700000000.5")]
TRANSFER_ENCODINGS = [b"chunked", b"Chunked", b"chunked, identity", b"gzip, chunked", b" chunked", b"chunked\x00",
                      b"chunked, chunked", b"x", b"", b"identity, chunked"]


@st.composite
def odd_headers(draw) -> list[tuple[bytes, bytes]]:
    """Headers beyond the protocol's own: odd ones, random ones, a huge line, many of them."""
    kind = draw(st.integers(0, 4))
    if kind <= 1:
        return [draw(st.sampled_from(ODD_HEADERS)) for _ in range(kind + 1)]
    if kind == 2:
        return [(draw(st.binary(min_size=1, max_size=12)), draw(st.binary(max_size=40)))]
    if kind == 3:
        return [(b"X-Big", b"b" * draw(st.sampled_from([8000, 8170, 8190, 8191, 9000, 70000])))]
    return [(b"X-%d" % i, b"v") for i in range(draw(st.sampled_from([100, 120, 126, 127, 128, 129, 200, 1000])))]


@st.composite
def chunked(draw, body: bytes) -> bytes:
    """``body`` as chunks whose size lines are usually right and sometimes not (bad hex, negative, huge, missing)."""
    cuts = sorted({0, len(body), *draw(st.lists(st.integers(0, len(body)), max_size=4))})
    out = b""
    for pos, end in zip(cuts, cuts[1:]):
        n = end - pos
        size = b"%x" % n
        if rare(draw, 6):
            size = draw(st.sampled_from([b"zz", b"-1", b"f" * 20, b"%x;ext=x" % n, b"0x%x" % n, b" %x" % n,
                                         b"%x " % n, b"", b"%x" % (n + 1), b"%x" % max(0, n - 1), b"\xff"]))
        out += size + b"\r\n" + body[pos:end] + (b"" if rare(draw, 20) else b"\r\n")
    return out + draw(st.sampled_from([b"0\r\n\r\n"] * 4 + [b"0\r\n", b"", b"0\r\nX-T: 1\r\n\r\n", b"00\r\n\r\n"]))


@st.composite
def odd_framing(draw, body: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, body on the wire): Content-Length wrong in some way, or chunked (with it or not)."""
    if rare(draw, 2):
        return [(b"Content-Length", v) for v in draw(odd_lengths(len(body)))], body
    headers = [(b"Transfer-Encoding", te) for te in draw(st.lists(st.sampled_from(TRANSFER_ENCODINGS), min_size=1,
                                                                  max_size=2))]
    wire = draw(chunked(body))
    if rare(draw, 3):
        headers.append((b"Content-Length", str(len(wire)).encode()))
    return headers, wire


BODIES = [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"0\r\n\r\n", b"\r\n\r\n", b"\x00" * 16]


@st.composite
def bodies(draw) -> bytes:
    """Random bytes of a drawn size (the content rarely matters, the size does), or a body that looks like HTTP."""
    if rare(draw, 8):
        return draw(st.sampled_from(BODIES))
    n = draw(st.sampled_from([0, 1, 3, 64, 1500]) | st.integers(0, 2000))
    return random.Random(draw(st.integers(0, 2**32 - 1))).randbytes(n)


@st.composite
def requests(draw, sandbox: str) -> Request:
    """One request, right in every part but a few drawn flaws (often none or one): the handler is reached too."""
    n = draw(st.sampled_from([0, 1, 1, 1, 1, 2, 2, 3]))
    odd = set(draw(st.lists(st.sampled_from(FLAWS), min_size=n, max_size=n, unique=True)))
    method = draw(st.sampled_from(ODD_METHODS) | st.binary(min_size=1, max_size=10) if "method" in odd
                  else st.sampled_from(METHODS))
    body = draw(bodies()) if method in (b"PUT", b"POST") or rare(draw, 5) else b""
    sha = hashlib.sha256(body).hexdigest()
    target = draw(odd_targets(sha, sandbox) if "target" in odd else targets(method, sha))
    version = draw(st.sampled_from(VERSIONS)) if "version" in odd else b"HTTP/1.1"
    headers = [] if "host" in odd and rare(draw, 2) else [(b"Host", b"127.0.0.1")]
    auth = draw(odd_authorizations()) if "auth" in odd else [GOOD_AUTH]
    headers += [(b"Authorization", a) for a in auth]
    if method == b"POST":
        headers.append((b"X-Content-SHA256", draw(st.sampled_from([sha, sha.upper(), sha + " ", sha[:-1], "0" * 64, "",
                                                                   sha + "\u0661"]) if "target" in odd
                                                  else st.just(sha)).encode()))
    framing, wire = draw(odd_framing(body)) if "framing" in odd else ([(b"Content-Length", b"%d" % len(body))], body)
    headers += framing + draw(odd_headers() if "headers" in odd else st.lists(st.sampled_from(META_HEADERS),
                                                                               max_size=2))
    if "host" in odd and headers and headers[0][0] == b"Host":
        headers.append(draw(st.sampled_from([(b"Host", b"other"), (b"Host", b""), (b"Host", b"\xff"), (b"host", b"x")])))
    if len(headers) > 1 and rare(draw, 4):
        headers = draw(st.permutations(headers))
    eol = draw(st.sampled_from([b"\n", b"\r", b"\n\r", b"\r\r\n"])) if "eol" in odd else b"\r\n"
    sep = draw(st.sampled_from([b":", b" : ", b":\t", b" ", b"::"])) if "sep" in odd else b": "
    line = method + b" " + target + (b" " + version if version else b"")
    data = eol.join([line] + [k + sep + v for k, v in headers]) + eol + eol + wire
    auth = [v for k, v in headers if k.lower() == b"authorization"]  # the server reads the first one, trimmed
    return Request(data, method == b"HEAD", bool(auth) and auth[0].strip(b" \t") == GOOD_AUTH, (wire, body))


GARBAGE = [b"\r\n", b"\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x00" * 8,
           b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", "\u00e9\u20ac\r\n".encode(), b" "]


@st.composite
def single_cases(draw, sandbox: str) -> Case:
    """One request, sent at once; the connection stays open for the answer."""
    r = draw(requests(sandbox))
    return Case([r.data], [r])


@st.composite
def stream_cases(draw, sandbox: str) -> Case:
    """Garbage before the request line, pipelined requests, a cut, sends in pieces, a half-close."""
    reqs = draw(st.lists(requests(sandbox), min_size=1, max_size=4))
    data = b"".join(r.data for r in reqs)
    if rare(draw, 3):
        data = (draw(st.sampled_from(GARBAGE)) if rare(draw, 2) else draw(st.binary(min_size=1, max_size=64))) + data
    if rare(draw, 4):
        data = data[:draw(st.integers(0, len(data)))]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)]) if b > a]
    return Case(pieces, reqs, half_close=rare(draw, 5))


@dataclass
class Answer:
    """One HTTP response read off the connection."""

    status: int
    head: bytes
    body: bytes


STATUS = re.compile(rb"HTTP/\d\.\d (\d{3})(?: [^\r\n]*)?")  # aiohttp answers in the version asked (0.9 too)


def parse_answer(buf: bytes, head_only: bool) -> tuple[Answer, bytes] | None:
    """The first complete response in ``buf`` and what follows it, or None while incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head, rest = buf[:end], buf[end + 4:]
    first, *lines = head.split(b"\r\n")
    m = STATUS.fullmatch(first)
    assert m, f"not an HTTP response: {buf[:200]!r}"
    status = int(m.group(1))
    n = 0
    # no body after a HEAD's answer; but the server may have seen other requests than the ones sent (garbage
    # before, a cut, a body longer than declared): a body is what follows unless it is the next status line
    head_only = head_only and (not rest or rest.startswith(b"HTTP/"))
    if not head_only and status >= 200 and status not in (204, 304):
        sizes = [int(v) for k, _, v in (ln.partition(b":") for ln in lines) if k.strip().lower() == b"content-length"]
        assert len(sizes) == 1, f"response without one Content-Length: {head[:300]!r}"
        n = sizes[0]
    if len(rest) < n:
        return None
    return Answer(status, head, rest[:n]), rest[n:]


def read_answers(sock: socket.socket, heads: list[bool]) -> tuple[list[Answer], bool]:
    """Responses until one per request or the server closes (reset = closed); (answers, closed).

    A bound, not a measurement: no answer and no close within CASE_TIMEOUT_S fails the case.
    """
    end = time.monotonic() + CASE_TIMEOUT_S
    buf, answers, closed, reset = b"", [], False, False
    while len(answers) < len(heads):
        got = parse_answer(buf, heads[len(answers)])
        if got is not None:
            ans, buf = got
            if ans.status >= 200:  # interim answers (100 Continue) are not the answer
                answers.append(ans)
            continue
        if closed:
            break
        sock.settimeout(max(0.001, end - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            chunk, reset = b"", True
        except TimeoutError:
            raise AssertionError(f"no answer and no close in {CASE_TIMEOUT_S} s: {len(answers)} of "
                                 f"{len(heads)} answers, {buf[:200]!r}") from None
        closed = not chunk
        buf += chunk
    assert reset or not closed or not buf, f"the server closed in the middle of an answer: {buf[:300]!r}"
    return answers, closed


def check_answer(ans: Answer, case: Case) -> None:
    """A 4xx, or a 200/201 a request of the case deserved; one line, never a traceback."""
    assert ans.status in (200, 201) or 400 <= ans.status < 500, (ans.status, ans.body[:300])
    assert b"Traceback" not in ans.body and len(ans.body.strip().splitlines()) <= 1, ans.body[:300]
    if ans.status < 300 and ans.body:
        doc = json.loads(ans.body)
        if "sha256" in doc:  # an upload was taken: an authenticated request sent exactly this body
            assert doc["sha256"] in case.allowed, ("stored without the token or not the body sent", doc)
        if "segments" in doc:
            assert any(r.authorised for r in case.requests), "the listing without the token"


def send(srv: Server, case: Case) -> tuple[list[Answer], bool]:
    """The case's bytes on a fresh connection, then its answers (a refusal that closes early is fine)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=CASE_TIMEOUT_S) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):  # reset, broken pipe, not connected (to half-close) after a refusal
            for piece in case.pieces:
                s.sendall(piece)
            if case.half_close:
                s.shutdown(socket.SHUT_WR)
        return read_answers(s, [r.head_only for r in case.requests])


def upload_still_works(srv: Server) -> str:
    """A valid authenticated upload of new content is stored (201): the server is alive and still serving."""
    body = os.urandom(1 + os.urandom(1)[0])
    sha = hashlib.sha256(body).hexdigest()
    req = Request(b"PUT /segments/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: %s\r\nContent-Length: %d\r\n\r\n%s"
                  % (sha.encode(), GOOD_AUTH, len(body), body), False, True, (body,))
    answers, _closed = send(srv, Case([req.data], [req]))
    assert answers and answers[0].status == 201, ("a valid upload after the case failed", answers)
    assert json.loads(answers[0].body) == {"sha256": sha, "result": "created"}
    assert (srv.store / "objects" / sha).read_bytes() == body
    return sha


def idle(srv: Server) -> bool:
    """No upload in progress (the listing's counter): a body whose client left before the answer has landed."""
    req = b"GET /segments HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: %s\r\n\r\n" % GOOD_AUTH
    with socket.create_connection(("127.0.0.1", srv.port), timeout=CASE_TIMEOUT_S) as s:
        s.sendall(req)
        answers, _closed = read_answers(s, [False])
    assert answers and answers[0].status == 200, answers
    return json.loads(answers[0].body)["server"]["uploads_active"] == 0


def check_files(srv: Server, allowed: set[str]) -> None:
    """Nothing outside the store, nothing half-received, only allowed objects (each its hash); then empty it."""
    tmp, objects = srv.store / "tmp", srv.store / "objects"
    assert wait_for(lambda: idle(srv) and not any(tmp.iterdir()), 5), \
        f"uploads still running or partial bodies left: {sorted(os.listdir(tmp))[:5]}"
    dirs = {srv.sandbox, srv.sandbox / "a", srv.sandbox / "a" / "b", srv.store, tmp, objects}
    for d, subdirs, files in os.walk(srv.sandbox):
        here = Path(d)
        assert here in dirs and (not files or here == objects), f"written outside the store: {here}, {files[:5]}"
        assert all(here / s in dirs for s in subdirs), f"a directory outside the store: {here}, {subdirs}"
    assert not any((p / CANARY).exists() for p in objects.parents), "a traversal target was written"
    for p in objects.iterdir():
        sha = p.name.removesuffix(".json")
        assert HEX64.fullmatch(sha) and sha in allowed, f"stored without a right to: {p.name!r}"
        if p.name == sha:
            assert hashlib.sha256(p.read_bytes()).hexdigest() == sha, f"stored content does not match {sha}"
        p.unlink()


def check_log(srv: Server) -> None:
    """Every new line of the server's log is one DEBUG/INFO record; no traceback, no internal error."""
    for line in srv.new_log_lines():
        assert LOG_LINE.match(line) and b"Traceback" not in line and b"internal error" not in line, line[:500]


def run_case(srv: Server, case: Case) -> None:
    """One case and every check after it (answers, liveness, files, log, memory)."""
    answers, closed = send(srv, case)
    for ans in answers:
        check_answer(ans, case)
        srv.statuses[ans.status] += 1
    if closed and len(answers) < len(case.requests):
        srv.statuses[0] += 1  # 0 = closed without (all) answers
    assert srv.proc.poll() is None, "the server died"
    check_files(srv, case.allowed | {upload_still_works(srv)})
    check_log(srv)
    rss = psutil.Process(srv.proc.pid).memory_info().rss
    srv.rss.append(rss)
    assert rss < RSS_LIMIT, f"server resident memory {rss >> 20} MiB"


def test_segment_name_with_a_line_break_is_refused_before_the_body(tmp_path: Path) -> None:
    """``PUT /segments/<sha>%0A`` is a 400 naming the rule, answered before the body (found by the name fuzz).

    It passed the name check, so the body was received into a temp file whose name held the line break.
    """
    body = b"abc"
    sha = hashlib.sha256(body).hexdigest()
    srv = IngestServer(tmp_path / "cloud", TOKEN).start()
    try:
        for target in (f"/segments/{sha}%0A", f"/segments/{sha}%0a"):
            req = Request(f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                          f"Content-Length: 3\r\n\r\n".encode() + body, False, True, (body,))
            with socket.create_connection(("127.0.0.1", srv.port), timeout=CASE_TIMEOUT_S) as s:
                s.sendall(req.data)
                (ans,), _closed = read_answers(s, [False])
            assert (ans.status, json.loads(ans.body)) == (400, {"error": "need sha256 (64 hex) in path or X-Content-SHA256"})
        assert srv.stats.body_bytes == 0 and srv.store.rejected == 0 and srv.store.list() == []
    finally:
        srv.stop()


KINDS = {"single": single_cases, "stream": stream_cases}


def bad(data: bytes) -> Case:
    """A case of one request the parser refuses (no token, nothing to store)."""
    return Case([data], [Request(data, False, False, ())])


#: cases once found by the fuzz (run before the drawn ones)
EXAMPLES = {"single": [bad(b"P%sT /segments HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")]}  # "%" there broke the log
#: cases run per kind (checked: hypothesis really ran as many as asked)
RAN: dict[str, int] = {}


def fuzz(srv: Server, kind: str, cases: int) -> None:
    """``cases`` hypothesis cases of one kind against the server; then the memory growth over the run."""
    srv.rss.clear()
    srv.statuses.clear()
    assert wait_for(lambda: idle(srv), 5)
    for f in (srv.store / "objects").iterdir():  # a run starts with an empty store, whatever a failed run left
        f.unlink()
    RAN[kind] = 0
    strategy = KINDS[kind](str(srv.sandbox))

    @settings(max_examples=cases, **SETTINGS)
    @given(case=strategy)
    def body(case: Case) -> None:
        RAN[kind] += 1
        run_case(srv, case)

    for case in EXAMPLES.get(kind, []):
        body = example(case=case)(body)

    t0 = time.monotonic()
    body()
    took = time.monotonic() - t0
    assert RAN[kind] >= cases
    warm = srv.rss[len(srv.rss) // 10]
    print(f"\n{kind}: {RAN[kind]} cases in {took:.0f} s, answers by status (0 = closed): {dict(sorted(srv.statuses.items()))}, "
          f"server RSS (MiB) after each tenth {[srv.rss[len(srv.rss) * i // 10 - 1] >> 20 for i in range(1, 11)]}, "
          f"peak {max(srv.rss) >> 20}")
    assert srv.rss[-1] - warm < RSS_GROWTH, f"server memory grew by {(srv.rss[-1] - warm) >> 20} MiB"


@pytest.mark.e2e  # a server process and thousands of connections
@pytest.mark.parametrize("kind", list(KINDS))
def test_hostile_requests_get_4xx_or_close(kind: str, server: Server) -> None:
    """>= 340 hostile requests (or streams) per kind: 4xx or close in bounded time, nothing stored or escaped."""
    fuzz(server, kind, FAST_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_hostile_requests_long_run(kind: str, server: Server) -> None:
    """The long run: 50,000 cases per kind (100,000 in all)."""
    fuzz(server, kind, SLOW_CASES)
