"""Vectorised decode of whole logs: identical to the per-frame path, rows as PackSamples."""

from __future__ import annotations

import math

import can
import numpy as np
import pytest
from testutil import deadline, peak_memory, synthetic_messages

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.frames import FrameArrays
from bms_ai.can.logs import iter_log, read_log
from bms_ai.can.offline import (
    concat_tables,
    decode_chunks,
    decode_frames,
    decode_log_chunks,
    sample,
    sample_frames,
    sample_instants,
    sample_times,
)
from bms_ai.can.sampler import FixedRateSampler, first_k_at_or_after


def test_offline_vectorised_equals_per_frame_path(decoder):
    """The vectorised decoder gives the live path's samples and rejection counts, bad frames included."""
    msgs = synthetic_messages(decoder, 0.0, 3.0)
    # sprinkle bad frames: corrupt CRC, unknown id, backwards time, wrong DLC
    msgs[10].data[0] ^= 0xFF
    msgs[20].arbitration_id = 0x555
    msgs[30].timestamp = msgs[29].timestamp - 1.0
    msgs[40].data = msgs[40].data[:4]
    msgs[40].dlc = 4
    sampler = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=0.5)
    live = [s for m in msgs for s in sampler.feed_message(m)]
    frames = FrameArrays.from_messages(msgs)
    dec = decode_frames(frames, decoder)
    times = sample_times(dec.t_first, dec.t_last, 0.1, dec.frame_ts)
    table = sample(dec, times, max_age=0.5)
    assert len(live) == len(table) > 25
    np.testing.assert_array_equal([s.stamp for s in live], table.t)
    np.testing.assert_array_equal(np.stack([s.cell_voltages for s in live]), table.cell_voltages)
    np.testing.assert_array_equal(np.stack([s.cell_temperatures for s in live]), table.cell_temperatures)
    np.testing.assert_array_equal([s.pack_current for s in live], table.pack_current)
    np.testing.assert_array_equal([s.pack_voltage for s in live], table.pack_voltage)
    assert table.rejected == sampler.asm.counters.rejected
    assert table.accepted == sampler.asm.counters.accepted


def test_sample_table_rows_are_the_live_samples(decoder):
    """SampleTable.samples() rebuilds the PackSamples the live sampler emits (values, stamps, status)."""
    msgs = synthetic_messages(decoder, 0.0, 1.5)
    sampler = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=1.0)
    live = [s for m in msgs for s in sampler.feed_message(m)]
    table, decoded = sample_frames(FrameArrays.from_messages(msgs), decoder, 0.1, 1.0)
    rows = list(table.samples())
    assert len(rows) == len(live) == len(table) > 10 and decoded.t_last == msgs[-1].timestamp
    for a, b in zip(rows, live):
        assert a.stamp == b.stamp and a.pack_voltage == b.pack_voltage and a.pack_current == b.pack_current
        np.testing.assert_array_equal(a.cell_voltages, b.cell_voltages)
        np.testing.assert_array_equal(a.cell_temperatures, b.cell_temperatures)
        assert a.status == {k: b.status.get(k, np.nan) for k in a.status}
    rows[0].cell_voltages[:] = 0.0  # rows are independent records
    assert rows[1].cell_voltages[0] != 0.0


def _live_and_offline(decoder, msgs, max_catchup: int = 600):
    """The samples and counters of the per-frame path and of the vectorised one for the same frames."""
    sampler = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=0.5, max_catchup=max_catchup)
    live = [s.stamp for m in msgs for s in sampler.feed_message(m)]
    table, _ = sample_frames(FrameArrays.from_messages(msgs), decoder, 0.1, 0.5, max_catchup)
    return live, sampler, table


def test_damaged_stamps_are_rejected_and_counted_not_looped_over(tmp_path, decoder):
    """1e300, inf, NaN and negative stamps in a candump log: counted as bad_time, both paths, promptly."""
    good = "120#E0306097F8FFE1FF"
    lines = ["(100.000000) can0 " + good, "(1e300) can0 " + good, "(inf) can0 " + good, "(nan) can0 " + good,
             "(-5.0) can0 " + good, "(100.500000) can0 " + good, "(101.000000) can0 " + good]
    path = tmp_path / "damaged.log"
    path.write_text("\n".join(lines) + "\n")
    with deadline(10.0):
        frames = read_log(path)
        msgs = list(iter_log(path))
        live, sampler, table = _live_and_offline(decoder, msgs)
    assert frames.error is None and len(frames) == 7
    assert table.rejected["bad_time"] == sampler.asm.counters.rejected["bad_time"] == 4
    np.testing.assert_array_equal(live, table.t)
    assert len(table) == 9  # 100.1 .. 100.9: the damaged stamps neither add nor stop instants


@pytest.mark.parametrize("stamps", [(0.0, 1e9), (-100.0, 5.0, 1e9 + 5.0), (1.0, 2.0**62, 1e9)])
def test_huge_time_gaps_are_bounded_skipped_and_counted(decoder, stamps):
    """Frames 1e9 s apart (or a negative first stamp, or a 2^62 one): at most max_catchup samples per gap.

    The skipped instants are counted; memory stays small (no array over the whole span).
    """
    msgs = [can.Message(timestamp=t, arbitration_id=0x120, is_extended_id=False, data=bytes(8)) for t in stamps]
    with deadline(10.0), peak_memory() as peak:
        live, sampler, table = _live_and_offline(decoder, msgs, max_catchup=50)
    assert peak[0] < 20e6
    np.testing.assert_array_equal(live, table.t)
    assert 0 < len(table) <= 50 * len(stamps)
    assert table.skipped == sampler.skipped > 1e9
    assert table.rejected["bad_time"] == sum(not 0 <= t < 2**32 for t in stamps)


def test_sample_instants_equal_counting_one_by_one():
    """The vectorised instants equal the live sampler's rule on random frame times with gaps and ties."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        ts = np.sort(rng.choice([0.0, 0.05, 0.1, 3.0, 70.0], size=30).cumsum() + rng.uniform(0, 5))
        ts[5] = ts[4]  # a tie
        times, skipped, _ = sample_instants(ts, 0.1, max_catchup=40)
        k = first_k(ts[0])
        want, skip = [], 0
        for t in ts[1:]:
            n = 0
            while t > k * 0.1:
                if n == 40:
                    nk = first_k_at_or_after(t, 0.1)
                    skip += nk - k
                    k = nk
                    break
                want.append(k * 0.1)
                k += 1
                n += 1
        np.testing.assert_array_equal(times, want)
        assert skipped == skip


def first_k(t: float) -> int:
    """The live sampler's first instant: strictly after the first frame."""
    return math.floor(t / 0.1) + 1


def test_negative_arbitration_id_in_csv_is_a_counted_rejection(tmp_path, decoder):
    """A python-can CSV with a negative id: read, counted as bad_id in both paths, no OverflowError."""
    path = tmp_path / "neg.csv"
    path.write_text("timestamp,arbitration_id,extended,remote,error,dlc,data\n"
                    "100.0,0x120,0,0,0,8,4DBgl/j/4f8=\n100.1,-0x5,0,0,0,8,4DBgl/j/4f8=\n"
                    "100.2,0x120,0,0,0,8,4DBgl/j/4f8=\n")
    frames = read_log(path)
    assert frames.error is None and len(frames) == 3
    live, sampler, table = _live_and_offline(decoder, list(iter_log(path)))
    assert table.rejected["bad_id"] == sampler.asm.counters.rejected["bad_id"] == 1
    np.testing.assert_array_equal(live, table.t)


def _nan_equal(a, b) -> None:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaN == NaN here


@pytest.mark.parametrize(("rows", "n"), [(7, 150), (97, None), (500, None)])
def test_decoding_in_chunks_equals_decoding_whole(decoder, rows, n):
    """Chunk boundaries change nothing: samples, ageing, rejections, alive-counter errors, gap skips."""
    msgs = synthetic_messages(decoder, 10.0, 12.0)
    msgs[next(i for i, m in enumerate(msgs) if m.arbitration_id == 0x120)].data[0] ^= 0xFF  # a bad checksum
    msgs[20].arbitration_id = 0x555  # an unknown id
    msgs[30].timestamp = msgs[29].timestamp - 1.0  # backwards
    del msgs[100:180]  # a gap: values age out across it
    for m in msgs[1500:]:
        m.timestamp += 100.0  # a long gap: instants skipped
    msgs = msgs[:n] if n else msgs
    frames = FrameArrays.from_messages(msgs)
    whole, _ = sample_frames(frames, decoder, 0.1, 0.5, max_catchup=50)
    parts = [FrameArrays(frames.ts[i:i + rows], frames.ids[i:i + rows], frames.ext[i:i + rows],
                         frames.dlc[i:i + rows], frames.data[i:i + rows], frames.bad[i:i + rows])
             for i in range(0, len(frames), rows)]
    chunked = concat_tables(list(decode_chunks(parts, decoder, 0.1, 0.5, max_catchup=50)))
    for f in ("t", "pack_voltage", "pack_current", "cell_voltages", "cell_temperatures"):
        _nan_equal(getattr(chunked, f), getattr(whole, f))
    for k in whole.status:
        _nan_equal(chunked.status[k], whole.status[k])
    assert (chunked.rejected, chunked.accepted, chunked.skipped) == (whole.rejected, whole.accepted, whole.skipped)
    assert chunked.counter_errors == {k: v for k, v in whole.counter_errors.items()}
    assert whole.rejected["crc_error"] == 1 and whole.rejected["time_backwards"] == 1
    assert whole.skipped > 0 or n


def _long_blf(tmp_path, decoder, seconds: int):
    """A BLF of ``seconds`` s of the reference pack's traffic (1 s of frames repeated in time)."""
    one = synthetic_messages(decoder, 0.0, 1.0)
    path = tmp_path / f"drive{seconds}.blf"
    with can.BLFWriter(str(path)) as w:
        for k in range(seconds):
            for m in one:
                w.on_message_received(can.Message(timestamp=m.timestamp + k, arbitration_id=m.arbitration_id,
                                                  is_extended_id=False, data=m.data))
    return path


def test_streamed_decode_memory_is_flat_in_drive_length(tmp_path, decoder):
    """Peak memory of decoding a 4x longer log stays about the same (chunks, not the whole log).

    Decoding the whole log at once takes about 4x here: the test can fail.
    """
    peaks = []
    for seconds in (3, 12):
        path = _long_blf(tmp_path, decoder, seconds)
        n = 0
        with peak_memory() as peak:
            for table in decode_log_chunks(path, decoder.cfg, decoder=decoder, rows=2000):
                n += len(table)
        assert n == 10 * seconds - 1
        peaks.append(peak[0])
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_blf_stamp_beyond_2_63_ns_is_a_counted_rejection(tmp_path, decoder):
    """A BLF frame 2^63 ns after the start: read (python-can path), rejected as bad_time, others decoded."""
    msgs = synthetic_messages(decoder, 10.0, 10.3)
    msgs.insert(len(msgs) // 2, can.Message(timestamp=9.3e9, arbitration_id=0x120, is_extended_id=False,
                                            data=bytes(8)))
    path = tmp_path / "far.blf"
    with can.BLFWriter(str(path)) as w:
        for m in msgs:
            w.on_message_received(m)
    frames = read_log(path)
    assert frames.error is None and len(frames) == len(msgs) and frames.ts.max() > 2**32
    table, _ = sample_frames(frames, decoder, 0.1, 1.0)
    assert table.rejected["bad_time"] == 1 and table.rejected["time_backwards"] == 0
    assert len(table) == 2 and table.skipped == 0
