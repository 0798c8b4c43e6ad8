"""Vectorised decode of whole logs: identical to the per-frame path, rows as PackSamples."""

from __future__ import annotations

import numpy as np
from testutil import synthetic_messages

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.frames import FrameArrays
from bms_ai.can.offline import decode_frames, sample, sample_frames, sample_times
from bms_ai.can.sampler import FixedRateSampler


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
