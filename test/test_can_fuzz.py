"""Fuzzing every log reader: byte flips, cuts and odd tokens in small valid logs never escape.

Each case mutates a small valid log (ASC, BLF plain and compressed, candump
.log, TRC, python-can CSV), then reads it whole, in chunks and frame by
frame, and decodes it with the reference pack. The only exception allowed is
the one-line :class:`~bms_ai.can.logs.LogError` ("cannot open as a CAN log");
every case runs under a deadline in CPU seconds (a hang fails the case instead of the run)
and a memory cap (address space: an unbounded allocation is a MemoryError).

The default run is >= 2,000 cases; ``pytest -m slow test/test_can_fuzz.py``
runs >= 100,000 (docs/can_logs.md, section on fuzzing; results under reports/fuzz/).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import can
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testutil import deadline, memory_cap, synthetic_messages

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.frames import FrameArrays
from bms_ai.can.logs import LogError, iter_log, read_log, read_log_chunks
from bms_ai.can.offline import decode_frames, sample_instants
from bms_ai.can.sampler import FixedRateSampler

#: seed logs: kind -> file name (its suffix picks the writer and the reader)
SEEDS = {"asc": "seed.asc", "blf": "seed.blf", "blf-zlib": "seed_zlib.blf", "log": "seed.log",
         "trc": "seed.trc", "csv": "seed.csv"}
QUICK_CASES = 15  # per seed, in the fast library tier: a smoke run while editing
FAST_CASES = int(os.environ.get("BMS_AI_FUZZ_CASES", "340"))  # per seed, in CI (marker fuzz): >= 2,000 in all
SLOW_CASES = 17_000  # per seed: >= 100,000 in all
CASE_SECONDS = 5.0  # CPU seconds: a case taking longer is a hang (a loaded machine does not count)
CASE_BYTES = 256 * 2**20  # growth of the process's address space allowed in one case
#: tokens that break parsers in interesting ways (stamps, ids, sizes, line structure)
TOKENS = [b"1e300", b"inf", b"nan", b"-", b"-1", b"0x", b"99999999999999999999", b"\n", b"\r\n", b" ",
          b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80", b"LOBJ", b"#", b"e", b";", b","]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, decoder) -> dict[str, bytes]:
    """Small valid logs of 30 frames of the reference pack, one per reader."""
    d = tmp_path_factory.mktemp("seeds")
    msgs = synthetic_messages(decoder, 10.0, 10.03)[:30]
    out = {}
    for kind, name in SEEDS.items():
        path = d / name
        if kind == "blf":  # uncompressed: mutations reach the object headers
            w = can.BLFWriter(str(path), compression_level=0)
        else:
            w = can.Logger(str(path))
        with w:
            for m in msgs:
                w.on_message_received(m)
        out[kind] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    """Where each case's file is written (hypothesis reruns the test body many times)."""
    return tmp_path_factory.mktemp("fuzz")


@st.composite
def mutations(draw, size: int):
    """Byte flips (up to ~10 % of the bytes), inserted tokens and an optional cut, as a list of edits.

    The flips come from a drawn random seed (hundreds of separate draws would
    make generation, not reading, the cost of a case).
    """
    n_flips = draw(st.integers(0, max(1, size // 10)))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    edits = [("flip", rng.randrange(size), rng.randrange(256)) for _ in range(n_flips)]
    edits += [("insert", draw(st.integers(0, size)), draw(st.sampled_from(TOKENS)))
              for _ in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        edits.append(("cut", draw(st.integers(0, size)), b""))
    return edits


def mutate(seed: bytes, edits) -> bytes:
    """Apply the edits in order (positions clipped to the current length)."""
    data = bytearray(seed)
    for kind, pos, arg in edits:
        pos = min(pos, len(data))
        if kind == "flip" and pos < len(data):
            data[pos] = arg
        elif kind == "insert":
            data[pos:pos] = arg
        elif kind == "cut":
            del data[pos:]
    return bytes(data)


def exercise(path: Path, decoder) -> None:
    """Every way the project reads a log: whole, in chunks, frame by frame; decoded as the bridge would."""
    try:
        frames = read_log(path)
    except LogError as exc:  # the one documented error: one line naming the file
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    decoded = decode_frames(frames, decoder)
    sample_instants(decoded.frame_ts, 0.1, 600)
    errors: list[str] = []
    assert sum(len(c) for c in read_log_chunks(path, rows=8, errors=errors)) == len(frames)
    sampler = FixedRateSampler(PackAssembler(decoder), 0.1)
    n = 0
    for msg in iter_log(path, errors=[]):
        sampler.feed_message(msg)
        n += 1
    assert n == len(frames)
    assert isinstance(FrameArrays.empty(), FrameArrays)


def run_case(case_dir: Path, decoder, kind: str, data: bytes) -> None:
    """One mutated file through :func:`exercise` under the deadline and the memory cap (MemoryError beyond)."""
    path = case_dir / SEEDS[kind]
    path.write_bytes(data)
    with deadline(CASE_SECONDS, cpu=True), memory_cap(CASE_BYTES):
        exercise(path, decoder)


#: cases run per seed kind (checked: hypothesis really ran as many as asked)
RAN: dict[str, int] = {}


def _fuzz(kind: str, cases: int):
    @settings(max_examples=cases, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])
    @given(data=st.data())
    def body(seeds, case_dir, decoder, data) -> None:
        seed = seeds[kind]
        RAN[kind] = RAN.get(kind, 0) + 1
        run_case(case_dir, decoder, kind, mutate(seed, data.draw(mutations(len(seed)))))
    return body


def _run(kind: str, cases: int, seeds, case_dir, decoder) -> None:
    RAN[kind] = 0
    _fuzz(kind, cases)(seeds, case_dir, decoder)
    assert RAN[kind] >= cases


@pytest.mark.parametrize("kind", list(SEEDS))
def test_mutated_logs_never_escape_quick(kind, seeds, case_dir, decoder):
    """A few mutated files per reader (the fast tier's smoke run of the test below)."""
    _run(kind, QUICK_CASES, seeds, case_dir, decoder)


@pytest.mark.fuzz
@pytest.mark.parametrize("kind", list(SEEDS))
def test_mutated_logs_never_escape(kind, seeds, case_dir, decoder):
    """>= 340 mutated files per reader: frames or the one-line LogError, within the deadline and memory cap."""
    _run(kind, FAST_CASES, seeds, case_dir, decoder)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SEEDS))
def test_mutated_logs_never_escape_long_run(kind, seeds, case_dir, decoder):
    """The long run: >= 17,000 mutated files per reader (>= 100,000 in all)."""
    _run(kind, SLOW_CASES, seeds, case_dir, decoder)
