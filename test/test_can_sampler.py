"""Fixed-rate samples on CAN time: gaps, and whole logs fed at once like frame by frame."""

from __future__ import annotations

import math

import numpy as np
import pytest
from testutil import synthetic_messages

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.frames import FrameArrays
from bms_ai.can.offline import decode_frames, sample_times
from bms_ai.can.sampler import FixedRateSampler


def test_sampler_caps_catchup_over_gaps_same_as_offline(decoder):
    """Over a long gap both paths emit at most max_catchup instants, the same ones."""
    msgs = synthetic_messages(decoder, 0.0, 1.0) + [
        m for m in synthetic_messages(decoder, 0.0, 1.0)]
    for m in msgs[len(msgs) // 2:]:
        m.timestamp += 500.0  # 499 s gap: more than max_catchup instants
    sampler = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=1.0, max_catchup=50)
    live = [s.stamp for m in msgs for s in sampler.feed_message(m)]
    dec = decode_frames(FrameArrays.from_messages(msgs), decoder)
    offline = sample_times(dec.t_first, dec.t_last, 0.1, dec.frame_ts, max_catchup=50)
    np.testing.assert_array_equal(live, offline)
    assert sampler.skipped > 4000


def test_feed_arrays_equals_feeding_frame_by_frame(decoder):
    """A whole log at once (maximum-speed replay): same samples, same counters, same CAN clock."""
    msgs = synthetic_messages(decoder, 0.0, 1.0)
    msgs[next(i for i, m in enumerate(msgs) if m.arbitration_id == 0x120)].data[0] ^= 0xFF  # a bad checksum
    msgs[20].arbitration_id = 0x555  # an unknown id
    one = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=0.5)
    live = [s for m in msgs for s in one.feed_message(m)]
    whole = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=0.5)
    table = whole.feed_arrays(FrameArrays.from_messages(msgs))
    assert [s.stamp for s in table.samples()] == [s.stamp for s in live]
    np.testing.assert_array_equal(table.cell_voltages, np.stack([s.cell_voltages for s in live]))
    assert whole.asm.counters == one.asm.counters and whole.asm.counters.rejected["crc_error"] == 1
    assert whole.asm.last_ts == one.asm.last_ts == msgs[-1].timestamp
    empty = FixedRateSampler(PackAssembler(decoder), period=0.1)
    assert len(empty.feed_arrays(FrameArrays.from_messages([]))) == 0 and empty.asm.last_ts == -math.inf


def test_feed_arrays_in_chunks_continues_like_frame_by_frame(decoder):
    """Chunks fed one after another: same samples, counters, latest values and alive-counter state."""
    msgs = synthetic_messages(decoder, 0.0, 1.0)
    msgs[20].arbitration_id = 0x555
    one = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=0.5)
    live = [s for m in msgs for s in one.feed_message(m)]
    chunked = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=0.5)
    frames = FrameArrays.from_messages(msgs)
    stamps = []
    for i in range(0, len(frames), 333):
        part = FrameArrays(*(getattr(frames, f)[i:i + 333] for f in ("ts", "ids", "ext", "dlc", "data", "bad")))
        stamps += [s.stamp for s in chunked.feed_arrays(part).samples()]
    assert stamps == [s.stamp for s in live]
    assert chunked.asm.counters == one.asm.counters and chunked.asm.last_ts == one.asm.last_ts
    np.testing.assert_array_equal(chunked.asm.sample.cell_voltages, one.asm.sample.cell_voltages)
    np.testing.assert_array_equal(chunked.asm.sample.cell_voltage_stamps, one.asm.sample.cell_voltage_stamps)
    assert chunked.asm.sample.status == one.asm.sample.status
    assert {n: st.last_counter for n, st in chunked.asm.stats.items()} == \
        {n: st.last_counter for n, st in one.asm.stats.items()}


def test_arrays_keep_per_message_receive_stats_like_frame_by_frame(decoder):
    """Counts, first and last receive time per message: a maximum-speed replay's timeouts and rates are real."""
    msgs = synthetic_messages(decoder, 0.0, 1.0)
    msgs[next(i for i, m in enumerate(msgs) if m.arbitration_id == 0x120)].data[0] ^= 0xFF  # rejected: not received
    one = FixedRateSampler(PackAssembler(decoder), period=0.1)
    for m in msgs:
        one.feed_message(m)
    chunked = FixedRateSampler(PackAssembler(decoder), period=0.1)
    frames = FrameArrays.from_messages(msgs)
    for i in range(0, len(frames), 333):
        chunked.feed_arrays(FrameArrays(*(getattr(frames, f)[i:i + 333] for f in ("ts", "ids", "ext", "dlc", "data", "bad"))))
    got = {n: (s.count, s.first_rx, s.last_rx) for n, s in chunked.asm.stats.items()}
    assert got == {n: (s.count, s.first_rx, s.last_rx) for n, s in one.asm.stats.items()}
    assert chunked.asm.check_timeouts(msgs[-1].timestamp) == []
    assert chunked.asm.rates()["BMS_PackMeas"] == pytest.approx(100.0, rel=0.02)


def _silent_after(decoder, t_end: float) -> FixedRateSampler:
    s = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=1.0, max_catchup=50)
    for m in synthetic_messages(decoder, 0.0, t_end):
        s.feed_message(m)
    return s


def test_silence_takes_each_instant_once_and_frames_resume_after_them(decoder):
    """close_until: the silent bus's instants on the grid, once each; resumed frames neither repeat nor back-fill."""
    sampler = _silent_after(decoder, 1.0)  # last frame just before 1.0 s: instants up to 0.9 s emitted
    out = sampler.close_until(1.25)
    assert [round(s.stamp, 9) for s in out] == [1.0, 1.1, 1.2]
    assert sampler.close_until(1.25) == [] and sampler.close_until(1.2) == []  # never twice, never backwards
    late = sampler.close_until(2.35)  # values older than max_age (1 s) are NaN
    assert np.isfinite(late[0].cell_voltages).all() and np.isnan(late[-1].cell_voltages).all()
    resumed = [s.stamp for m in synthetic_messages(decoder, 2.5, 3.0) for s in sampler.feed_message(m)]
    stamps = [s.stamp for s in out + late] + resumed
    assert np.all(np.diff(stamps) > 0) and np.allclose(np.diff(stamps), 0.1, atol=1e-9)
    assert round(stamps[-1], 9) == 2.9 and sampler.skipped == 0


def test_silence_is_bounded_before_the_first_frame_and_over_long_gaps(decoder):
    """No grid before the first frame; at most max_catchup instants per call, the rest skipped and counted."""
    empty = FixedRateSampler(PackAssembler(decoder), period=0.1)
    assert empty.close_until(100.0) == []
    sampler = _silent_after(decoder, 1.0)
    assert sampler.close_until(math.nan) == [] and sampler.close_until(math.inf) == []
    out = sampler.close_until(1000.0)
    assert len(out) == 50 and round(out[-1].stamp, 6) == 5.9 and sampler.skipped == 10000 - 60
    assert [round(s.stamp, 6) for s in sampler.close_until(1000.05)] == [1000.0]  # the grid goes on from there


def test_feed_burst_equals_feeding_frame_by_frame(decoder):
    """A burst gives the samples, counters and state of its frames fed one by one, damaged frames included."""
    msgs = synthetic_messages(decoder, 0.0, 3.0)
    msgs[40].timestamp = math.nan  # a damaged stamp
    msgs[41].timestamp = msgs[39].timestamp - 1.0  # time backwards
    msgs[42].is_error_frame = True
    msgs[43].data = bytes(msgs[43].data[:3])  # wrong length
    for m in msgs[len(msgs) // 2:]:
        m.timestamp += 7.0  # a gap: several instants closed by one frame

    ref = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=1.0)
    one = [s for m in msgs for s in ref.feed_message(m)]
    burst = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=1.0)
    got = [s for i in range(0, len(msgs), 37) for s in burst.feed_burst(msgs[i:i + 37])]
    assert len(got) == len(one) > 90
    for a, b in zip(got, one):
        np.testing.assert_array_equal([a.stamp, a.pack_voltage, a.pack_current], [b.stamp, b.pack_voltage, b.pack_current])
        np.testing.assert_array_equal(a.cell_voltages, b.cell_voltages)
        np.testing.assert_array_equal(a.cell_voltage_stamps, b.cell_voltage_stamps)
    assert burst.asm.counters == ref.asm.counters and burst.asm.counters.total_rejected >= 4
    assert burst.asm.stats == ref.asm.stats and burst.asm.last_ts == ref.asm.last_ts


@pytest.mark.drive
@pytest.mark.parametrize("name", ["nmc_udds", "lfp_udds", "nmc_isc"])
def test_bundled_drive_bursts_equal_the_vectorised_decoder(name):
    """A bundled drive fed as the paced replay feeds the bridge (light frames in bursts, the fused
    decoders) gives the vectorised decoder's samples: values, NaN pattern and sample stamps (its table
    has no per-value stamps; those are checked against the signal plans in test_can_assembler)."""
    import json
    from pathlib import Path

    from bms_ai.can.decoder import PackDecoder
    from bms_ai.can.logs import read_log
    from bms_ai.can.packconfig import load_pack_config

    root = Path(__file__).resolve().parents[1]
    d = root / "data" / "drives" / name
    dec = PackDecoder(load_pack_config(root / "config" / json.loads((d / "meta.json").read_text())["pack_config"]))
    frames = read_log(d / "can.blf")
    live = FixedRateSampler(PackAssembler(dec), period=0.1, max_age=1.0)
    rows = list(frames.frames())
    got = [s for i in range(0, len(rows), 70) for s in live.feed_burst(rows[i:i + 70])]
    table = FixedRateSampler(PackAssembler(dec), period=0.1, max_age=1.0).feed_arrays(frames)
    want = list(table.samples())
    assert len(got) == len(want) > 1000
    for name_ in ("stamp", "pack_voltage", "pack_current"):
        np.testing.assert_array_equal([getattr(s, name_) for s in got], [getattr(s, name_) for s in want])
    for name_ in ("cell_voltages", "cell_temperatures"):
        np.testing.assert_array_equal(np.stack([getattr(s, name_) for s in got]),
                                      np.stack([getattr(s, name_) for s in want]), err_msg=name_)
    assert [s.status for s in got] == [s.status for s in want]
    assert live.asm.counters.accepted == len(frames) and live.asm.counters.total_rejected == 0
