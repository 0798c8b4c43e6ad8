"""Log formats: round trips through every writer/reader, the suffix table, fuzzed and damaged files."""

from __future__ import annotations

import gzip

import can
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testutil import deadline, memory_cap, peak_memory, realdata, write_log

from bms_ai.can.frames import FrameArrays
from bms_ai.can.logs import (
    LOG_FORMATS,
    MAX_GAP,
    SEGMENT_STEP,
    LogError,
    LogFormat,
    Timeline,
    iter_log,
    log_format,
    log_suffix,
    read_log,
    read_log_chunks,
)
from bms_ai.can.offline import decode_log

FORMATS = [".asc", ".blf", ".log", ".trc", ".csv"]


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_every_format(tmp_path, decoder, messages, suffix):
    """Every writer python-can has reads back frame for frame and decodes without a rejection."""
    path = write_log(tmp_path / f"drive{suffix}", messages)
    frames = read_log(path)
    assert frames.error is None
    assert len(frames) == len(messages)
    np.testing.assert_array_equal(frames.ids, [m.arbitration_id for m in messages])
    ts = np.array([m.timestamp for m in messages])
    np.testing.assert_allclose(frames.ts - frames.ts[0], ts - ts[0], atol=1e-4)  # ASC/TRC store relative time
    for i in (0, 7, len(messages) - 1):
        assert bytes(frames.data[i, : frames.dlc[i]]) == bytes(messages[i].data)
    table = decode_log(path, decoder.cfg, rate=10.0)
    assert table.rejected == dict.fromkeys(table.rejected, 0)
    assert len(table) >= 9 and np.isfinite(table.cell_voltages[-1]).all()


@pytest.mark.parametrize("suffix", FORMATS)
def test_truncated_log_keeps_frames_before_damage(tmp_path, messages, suffix):
    """A log cut mid-file gives the frames before the cut, never an exception."""
    path = write_log(tmp_path / f"cut{suffix}", messages)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3] + b"\x00\xff garbage \x13")
    frames = read_log(path)  # never raises on damage; keeps what was readable
    assert 0 < len(frames) <= len(messages) + 1


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    """One directory for every fuzzed file (hypothesis reruns the test body many times)."""
    return tmp_path_factory.mktemp("fuzz")


@settings(deadline=None)
@given(blob=st.binary(max_size=600), suffix=st.sampled_from(FORMATS))
def test_fuzzed_log_files_never_escape(fuzz_dir, blob, suffix):
    """Arbitrary bytes under any suffix: frames, or the one documented error naming the file."""
    path = fuzz_dir / f"fuzz{suffix}"
    path.write_bytes(blob)
    try:
        frames = read_log(path)
    except ValueError as exc:  # the one documented error: cannot open as a CAN log
        assert str(path) in str(exc)
        return
    assert len(frames) >= 0


def test_suffix_table_knows_python_can_formats_and_explains_unknown_ones(tmp_path):
    """One table decides how a file is read; unknown suffixes and missing files fail in one clear line."""
    assert {".asc", ".blf", ".csv", ".log", ".trc", ".mf4"} <= set(LOG_FORMATS)
    assert log_suffix("a/B.ASC") == ".asc" and log_suffix("x.blf.gz") == ".blf" and log_suffix("noext") == ""
    assert log_format("d.blf").fast_arrays and not log_format("d.asc").fast_arrays
    odd = tmp_path / "drive.xyz"
    odd.write_text("1 2 3\n")
    for read in (read_log, lambda p: list(iter_log(p))):
        with pytest.raises(ValueError, match=r"drive\.xyz: cannot open as a CAN log .*known: \.asc, \.blf"):
            read(odd)
        with pytest.raises(FileNotFoundError, match="CAN log not found"):
            read(tmp_path / "missing.blf")


@pytest.mark.parametrize("suffix", [".asc", ".blf"])
def test_gzip_compressed_logs_read_like_plain_ones(tmp_path, messages, suffix):
    """``drive.asc.gz`` / ``drive.blf.gz`` go to their format's entry (python-can decompresses)."""
    plain = write_log(tmp_path / f"drive{suffix}", messages)
    packed = tmp_path / f"drive{suffix}.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = read_log(plain), read_log(packed)
    assert b.error is None and len(b) == len(a) == len(messages)
    np.testing.assert_array_equal(a.data, b.data)


class _TextLog(LogFormat):
    """A made-up format, one frame per line: ``timestamp id hexdata``."""

    def open(self, path):
        return _TextReader(path)


class _TextReader:
    def __init__(self, path) -> None:
        self.lines = path.read_text().splitlines()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __iter__(self):
        for line in self.lines:
            t, fid, data = line.split()
            yield can.Message(timestamp=float(t), arbitration_id=int(fid, 16), is_extended_id=False,
                              data=bytes.fromhex(data))


def test_a_new_log_format_is_one_table_entry(tmp_path, decoder, messages):
    """Registering a reader makes a format readable everywhere: arrays, messages, decode and replay."""
    import threading

    from bms_ai.can.sources import open_source

    if ".bmsaitest" not in LOG_FORMATS:
        LOG_FORMATS.add(".bmsaitest", _TextLog(), "test-only text format")
    path = tmp_path / "drive.bmsaitest"
    path.write_text("".join(f"{m.timestamp!r} {m.arbitration_id:x} {bytes(m.data).hex()}\n" for m in messages))
    assert len(read_log(path)) == len(list(iter_log(path))) == len(messages)
    table = decode_log(path, decoder.cfg, rate=10.0)
    assert table.rejected == dict.fromkeys(table.rejected, 0) and len(table) >= 9
    src = open_source(path, speed=0.0, lightweight=True)
    got = []
    for m in src.frames(threading.Event()):
        if src.finished:
            break
        if m is not None:
            got.append(m)
    assert [m.arbitration_id for m in got] == [m.arbitration_id for m in messages]


def _mixed_messages(messages, error_frame: bool):
    extra = [can.Message(timestamp=messages[-1].timestamp + 0.001 * k, arbitration_id=0x18FF50E5 + k,
                         is_extended_id=True, data=bytes(range(k % 9))) for k in range(20)]
    extra.append(can.Message(timestamp=extra[-1].timestamp + 0.001, arbitration_id=0x123, is_extended_id=False,
                             is_remote_frame=True, dlc=0))
    if error_frame:
        extra.append(can.Message(timestamp=extra[-1].timestamp + 0.001, is_error_frame=True))
    return list(messages) + extra


@pytest.mark.parametrize("error_frame", [False, True])
def test_fast_blf_reader_is_bit_identical_to_python_can(tmp_path, messages, error_frame):
    """The .blf array reader equals python-can's reader bit for bit (and hands error frames to it)."""
    path = write_log(tmp_path / "mixed.blf", _mixed_messages(messages * 8, error_frame))
    fast = read_log(path)  # fast path, or python-can when the file has error frames
    ref = FrameArrays.from_messages(iter_log(path))
    assert len(fast) == len(ref) > 10000  # several zlib containers (128 KiB: ~2700 frames each)
    for f in ("ts", "ids", "ext", "dlc", "data", "bad"):
        np.testing.assert_array_equal(getattr(fast, f), getattr(ref, f), err_msg=f)
    if not error_frame:
        from bms_ai.can.blf_fast import read_blf_arrays

        assert len(read_blf_arrays(path)) == len(ref)


def _blf_with_zero_size(tmp_path, messages, where: str):
    """An uncompressed BLF whose first object (the container, or the first frame in it) claims size 0."""
    import struct

    path = tmp_path / f"plain_{where}.blf"
    w = can.BLFWriter(str(path), compression_level=0)
    for m in messages[:20]:
        w.on_message_received(m)
    w.stop()
    raw = bytearray(path.read_bytes())
    i = raw.index(b"LOBJ") if where == "container" else raw.index(b"LOBJ", raw.index(b"LOBJ") + 16)
    struct.pack_into("<L", raw, i + 8, 0)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("where", ["container", "frame"])
def test_blf_object_of_size_zero_is_damage_not_an_endless_loop(tmp_path, messages, where):
    """A size field of 0 stops both readers with the reason; memory stays small."""
    path = _blf_with_zero_size(tmp_path, messages, where)
    with deadline(10.0), peak_memory() as peak:
        frames = read_log(path)
        errors: list[str] = []
        msgs = list(iter_log(path, errors))
    assert peak[0] < 20e6
    assert "object size 0" in frames.error and len(frames) == 0
    assert len(errors) == 1 and "object size 0" in errors[0] and msgs == []
    with pytest.raises(LogError, match="object size 0"):
        list(iter_log(path))


@pytest.mark.parametrize("suffix", FORMATS)
def test_cut_logs_say_truncated(tmp_path, messages, suffix):
    """A log cut mid-line (or mid-object) keeps the frames before and names the truncation."""
    path = write_log(tmp_path / f"cut{suffix}", messages)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 37])
    frames = read_log(path)
    assert "truncated" in frames.error and str(path) in frames.error
    assert 0 < len(frames) <= len(messages)
    whole = write_log(tmp_path / f"whole{suffix}", messages)
    assert read_log(whole).error is None


def test_asc_without_its_end_line_is_truncated(tmp_path, messages):
    """An ASC log cut at a line end still lacks 'End TriggerBlock': named as truncated."""
    path = write_log(tmp_path / "cut.asc", messages)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]))
    assert "truncated: no 'end triggerblock' line" in read_log(path).error


@pytest.mark.parametrize("suffix", [".blf", ".blf-error-frame", ".asc"])
def test_chunked_reading_equals_reading_whole(tmp_path, messages, suffix):
    """Chunks concatenate to the whole log; the fast BLF reader hands over to python-can mid-file exactly."""
    error_frame = suffix == ".blf-error-frame"
    path = write_log(tmp_path / f"mixed{suffix[:4]}", _mixed_messages(messages * 8, error_frame))
    whole = read_log(path)
    errors: list[str] = []
    chunks = list(read_log_chunks(path, rows=3000, errors=errors))
    assert errors == [] and len(chunks) >= 2 and max(len(c) for c in chunks) < 3000 + 6000  # whole containers
    for f in ("ts", "ids", "ext", "dlc", "data", "bad"):
        np.testing.assert_array_equal(np.concatenate([getattr(c, f) for c in chunks]), getattr(whole, f), err_msg=f)


def test_blf_header_size_field_is_checked_before_reading(tmp_path, messages):
    """A BLF file header claiming 4 GB is damage named in one line, not a 4 GB read (found by fuzzing)."""
    import struct

    path = write_log(tmp_path / "hdr.blf", messages[:20])
    raw = bytearray(path.read_bytes())
    struct.pack_into("<L", raw, 4, 0xFFFFFFF0)
    path.write_bytes(bytes(raw))
    with memory_cap(256 * 2**20):
        for read in (read_log, lambda p: list(read_log_chunks(p, errors=[]))):
            with pytest.raises(LogError, match="file header size 4294967280"):
                read(path)



GVRET_HEADER = "Time Stamp,ID,Extended,Bus,LEN,D1,D2,D3,D4,D5,D6,D7,D8\r\n"
GVRET_DIR_HEADER = "Time Stamp,ID,Extended,Dir,Bus,LEN,D1,D2,D3,D4,D5,D6,D7,D8\r\n"


def test_gvret_csv_reads_a_real_kona_drive():
    """SavvyCAN's GVRET CSV of a real Kona: every frame, microsecond stamps, hex ids and bytes, bus as channel."""
    path = realdata("kona/power-off-on-ready-off.gvret.csv")
    errors: list[str] = []
    msgs = list(iter_log(path, errors))
    frames = FrameArrays.from_messages(msgs)
    assert errors == [] and len(frames) == 39546
    assert frames.ts[0] == pytest.approx(1953.6135) and frames.ts[-1] - frames.ts[0] == pytest.approx(10.8404)
    first = msgs[0]
    assert (first.arbitration_id, bytes(first.data).hex(), first.channel) == (0x109, "000100ffffff0f3d", 0)
    # 0x595 Batt_HV_Status on bus 0 (P-CAN): VBatt (0.1 V, bytes 6-7 little endian) 354.8 .. 355.1 V
    vbatt = [int.from_bytes(m.data[6:8], "little") * 0.1 for m in msgs
             if m.arbitration_id == 0x595 and m.channel == 0]
    assert len(vbatt) == 70 and min(vbatt) == pytest.approx(354.8) and max(vbatt) == pytest.approx(355.1)


def test_gvret_csv_with_and_without_dir_column_read_alike(tmp_path):
    """Both SavvyCAN header variants; the Dir column marks transmitted frames; short frames keep their length."""
    rows = [(1000000, "000007E4", "false", "Tx", "1", 3, "30,00,00,,,,,"),
            (1002500, "18FF50E5", "true", "Rx", "0", 8, "01,02,03,04,05,06,07,08")]
    plain = tmp_path / "plain.csv"
    plain.write_text(GVRET_HEADER + "".join(f"{t},{i},{e},{b},{n},{d}\r\n" for t, i, e, _, b, n, d in rows))
    with_dir = tmp_path / "dir.csv"
    with_dir.write_text(GVRET_DIR_HEADER + "".join(f"{t},{i},{e},{r},{b},{n},{d}\r\n" for t, i, e, r, b, n, d in rows))
    a, b = list(iter_log(plain)), list(iter_log(with_dir))
    for msgs in (a, b):
        assert [m.timestamp for m in msgs] == [1.0, 1.0025]
        assert [m.arbitration_id for m in msgs] == [0x7E4, 0x18FF50E5]
        assert [m.is_extended_id for m in msgs] == [False, True]
        assert [bytes(m.data) for m in msgs] == [b"\x30\x00\x00", bytes(range(1, 9))]
        assert [m.channel for m in msgs] == [1, 0]
    assert [m.is_rx for m in b] == [False, True]


def test_csv_is_told_apart_by_its_header(tmp_path, messages):
    """python-can CSV still reads; a CSV of another tool is one line naming the file and both known headers."""
    assert len(read_log(write_log(tmp_path / "pc.csv", messages[:10]))) == 10
    other = tmp_path / "other.csv"
    other.write_text("time,id,data\n1,2,3\n")
    with pytest.raises(LogError, match=r"other\.csv: cannot open .*GVRET CSV \(Time Stamp,ID,\.\.\.\)") as exc:
        read_log(other)
    assert "\n" not in str(exc.value)


def test_damaged_or_cut_gvret_csv_keeps_the_frames_before(tmp_path):
    """A bad line ends the stream with its line number; a cut last line says truncated."""
    path = tmp_path / "bad.csv"
    good = "1000000,00000595,false,0,8,00,00,00,00,00,00,DC,0D\r\n"
    path.write_text(GVRET_HEADER + good * 3 + "1000100,zz,false,0,8,00\r\n" + good)
    frames = read_log(path)
    assert len(frames) == 3 and "line 5" in frames.error
    cut = tmp_path / "cut.csv"
    cut.write_text(GVRET_HEADER + good * 3 + good[:20])
    frames = read_log(cut)
    assert len(frames) == 3 and "truncated" in frames.error


def _restarted(tmp_path, messages, suffix: str, back: float = 100.0):
    """The drive twice, the second copy stamped ``back`` s earlier: a logger restarted, logs joined end to end.

    Written as text (python-can's writers clamp stamps that go back).
    """
    def line(m, t):
        if suffix == ".log":
            return f"({t:.6f}) can0 {m.arbitration_id:03X}#{bytes(m.data).hex().upper()}\n"
        return (f"{round(t * 1e6)},{m.arbitration_id:08X},false,0,{len(m.data)},"
                + ",".join(f"{b:02X}" for b in m.data) + "\r\n")
    body = "".join(line(m, m.timestamp) for m in messages) + "".join(line(m, m.timestamp - back) for m in messages)
    path = tmp_path / f"restart{suffix}"
    path.write_text(("" if suffix == ".log" else GVRET_HEADER) + body)
    return path


@pytest.mark.parametrize("suffix", [".log", ".csv"])
def test_a_jump_back_starts_a_rebased_segment_instead_of_dropping_the_rest(tmp_path, decoder, messages, suffix):
    """A log whose time restarts keeps every frame: the rest is shifted to follow; all three readers agree."""
    path = _restarted(tmp_path, messages, suffix)
    n = len(messages)
    tl = Timeline()
    whole = read_log(path, timeline=tl)
    assert len(whole) == 2 * n and (np.diff(whole.ts) >= 0).all()
    assert whole.ts[n] == pytest.approx(whole.ts[n - 1] + SEGMENT_STEP)
    assert (tl.segments, tl.rebased, tl.gaps) == (2, 1, 0) and "1 jumps back rebased" in tl.summary()
    chunks = np.concatenate([c.ts for c in read_log_chunks(path, rows=97)])
    stream = np.array([m.timestamp for m in iter_log(path)])
    np.testing.assert_array_equal(chunks, whole.ts)
    np.testing.assert_array_equal(stream, whole.ts)
    table = decode_log(path, decoder.cfg, rate=10.0)
    assert table.rejected["time_backwards"] == 0 and len(table) >= 19  # both copies sampled


def test_pauses_jitter_and_damaged_stamps_keep_their_stamps(tmp_path):
    """A pause over MAX_GAP is a counted segment, a step back of 22 ms (interleaved buses) is left for the
    decoders to reject, damaged stamps pass untouched (counted as bad_time by the decoders), never a segment."""
    stamps = [100.0, 100.05, 100.028, float("nan"), float("inf"), -3.0, 1e300, 100.1, 100.1 + MAX_GAP + 1, 1e9]
    tl = Timeline()
    got = [tl.stamp(t) for t in stamps]
    np.testing.assert_array_equal(got, stamps)
    assert (tl.segments, tl.rebased, tl.gaps) == (3, 0, 2)
    tl2 = Timeline()
    frames = tl2.arrays(FrameArrays.from_messages(
        [can.Message(timestamp=t, arbitration_id=0x120, is_extended_id=False) for t in stamps]))
    np.testing.assert_array_equal(frames.ts, stamps)
    assert (tl2.segments, tl2.rebased, tl2.gaps) == (3, 0, 2)


def test_stamps_jumping_back_and_forth_every_frame_stay_bounded():
    """Alternating 4e9 / 0 stamps: every other frame rebased, time increasing, work linear."""
    stamps = np.tile([4e9 - 1, 0.0], 5000)
    frames = FrameArrays.from_messages([can.Message(timestamp=float(t), arbitration_id=1) for t in stamps[:2]])
    frames = FrameArrays(stamps.copy(), *(np.resize(getattr(frames, f), (len(stamps),) + getattr(frames, f).shape[1:])
                                         for f in ("ids", "ext", "dlc", "data", "bad")))
    tl = Timeline()
    with deadline(5.0):
        out = tl.arrays(frames).ts
    assert (np.diff(out) > 0).all() and tl.rebased == 5000


def test_candump_with_and_without_the_interface_column(tmp_path):
    """candump -l lines, lines without the interface, -ta console lines, remote and FD frames: one reader."""
    p = tmp_path / "mixed.log"
    p.write_text("(1.000000) can0 123#1122\n(1.100000) 124#3344\n(1.2) can1 18FF0001#R\n(1.3) can0 123##1AABB\n"
                 "(1.400000) can0  123   [2]  11 22\n(1.5) 7FF [1] 05\n")
    f = read_log(p)
    assert f.error is None and f.ids.tolist() == [0x123, 0x124, 0x18FF0001, 0x123, 0x123, 0x7FF]
    assert f.ts.tolist() == [1.0, 1.1, 1.2, 1.3, 1.4, 1.5] and f.dlc.tolist() == [2, 2, 0, 2, 2, 1]
    assert bytes(f.data[4][:2]) == b"\x11\x22" and f.ext.tolist() == [False, False, True, False, False, False]
    console = tmp_path / "console.log"
    console.write_text("  can0  123   [2]  11 22\n")
    g = read_log(console)
    assert len(g) == 0 and "no timestamp" in g.error and "candump -l" in g.error
