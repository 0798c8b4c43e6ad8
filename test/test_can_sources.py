"""Frame sources: chosen by name, asked (not type-checked) how to treat them, replays identical either way."""

from __future__ import annotations

import math
import threading

import can
import numpy as np
import pytest
from testutil import deadline, write_log

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.frames import FrameArrays
from bms_ai.can.sampler import FixedRateSampler
from bms_ai.can.sources import SOURCES, BusSource, LogReplaySource, ReplayClock, SourceError, open_source
from bms_ai.core.registry import UnknownName


def _drain(src, stop=None):
    out = []
    for m in src.frames(stop or threading.Event()):
        if src.finished:
            break
        if m is not None:
            out.append(m)
    return out


def test_sources_by_name_and_what_the_bridge_asks_them(tmp_path, messages):
    """open_source picks the table entry; replay/speed/finished answer the bridge's questions."""
    assert SOURCES.names() == ["bus", "log"]
    log = write_log(tmp_path / "d.blf", messages)
    bus = open_source("", interface="virtual", channel="src_test", bus_options='{"receive_own_messages": false}')
    assert isinstance(bus, BusSource) and bus.description == "virtual:src_test"
    assert (bus.replay, bus.speed, bus.replaying, bus.frame_chunks()) == (False, 1.0, False, None)
    rep = open_source(log, speed=2.0)
    assert isinstance(rep, LogReplaySource) and rep.description == "log:d.blf"
    assert (rep.replay, rep.speed, rep.replaying, rep.frame_chunks()) == (True, 2.0, True, None)
    assert open_source(log, speed=0.0).speed == math.inf
    assert open_source(log, speed=math.inf, loop=True, lightweight=True).frame_chunks() is None
    chunks = list(open_source(log, speed=0.0, lightweight=True).frame_chunks())
    assert all(isinstance(c, FrameArrays) for c in chunks) and sum(map(len, chunks)) == len(messages)
    with pytest.raises(UnknownName, match="unknown CAN source 'can0'; known: bus, log"):
        open_source(log, kind="can0")


def test_source_configuration_errors_are_one_line(tmp_path):
    """A missing log or an unknown interface is a SourceError at once (a bus that does not open, when read);
    bus options that are not a JSON object are a ValueError."""
    with pytest.raises(SourceError, match="CAN log not found"):
        open_source(tmp_path / "nope.blf")
    with pytest.raises(ValueError, match="bus_options is not JSON"):
        open_source(interface="virtual", channel="x", bus_options="{bitrate: 5}")
    with pytest.raises(ValueError, match="must be a JSON object"):
        open_source(interface="virtual", channel="x", bus_options="[1]")
    with pytest.raises(SourceError, match=r"unknown CAN interface 'socketcn'; python-can has: .*socketcan"):
        open_source(interface="socketcn", channel="can0")  # a typo fails at start, not in a retry loop
    with pytest.raises(SourceError, match="cannot open CAN bus socketcan:nosuchbus0"):
        next(open_source(interface="socketcan", channel="nosuchbus0").frames(threading.Event()))


def test_bus_source_yields_frames_and_idle_polls():
    """A live bus gives what was sent, None while idle, and never finishes."""
    src = open_source(interface="virtual", channel="src_bus_test", bus_options={"receive_own_messages": False})
    tx = can.Bus(interface="virtual", channel="src_bus_test")
    stop = threading.Event()
    try:
        it = src.frames(stop)
        assert next(it) is None  # idle poll
        tx.send(can.Message(arbitration_id=0x120, data=b"\x01\x02", is_extended_id=False))
        got = next(m for m in it if m is not None)
        assert got.arbitration_id == 0x120 and bytes(got.data) == b"\x01\x02"
        assert not src.finished
    finally:
        stop.set()
        tx.shutdown()
        src.close()


def test_log_replay_finishes_then_stays_silent_and_loops_forward(tmp_path, messages):
    """After the last frame the replay is finished (a silent bus); a loop shifts time forward."""
    log = write_log(tmp_path / "d.blf", messages)
    src = open_source(log, speed=0.0)
    assert len(_drain(src)) == len(messages) and src.finished and not src.replaying
    loop = open_source(log, speed=0.0, loop=True)
    stop = threading.Event()
    ts = []
    for m in loop.frames(stop):
        ts.append(m.timestamp)
        if len(ts) == 2 * len(messages) + 1:
            stop.set()
    assert np.all(np.diff(ts) >= 0) and ts[len(messages)] == pytest.approx(ts[len(messages) - 1] + 0.01)


def test_lightweight_replay_source_yields_the_same_frames(tmp_path, messages, decoder):
    """The fast array path for replays gives the decoder exactly what python-can's messages give."""
    path = write_log(tmp_path / "d.blf", messages)

    def samples(lightweight: bool):
        src = LogReplaySource(path, speed=0.0, lightweight=lightweight)
        sampler = FixedRateSampler(PackAssembler(decoder), 0.1)
        out = []
        for m in _drain(src):
            out.extend(sampler.feed_message(m))
        return out, sampler.asm.counters

    fast, c_fast = samples(True)
    ref, c_ref = samples(False)
    assert len(fast) == len(ref) > 5 and c_fast == c_ref
    for a, b in zip(fast, ref):
        assert a.stamp == b.stamp
        np.testing.assert_array_equal(a.cell_voltages, b.cell_voltages)


def test_replay_clock_never_waits_for_damaged_stamps_or_long_breaks():
    """At 1x: damaged stamps are due at once, a 1e9 s break is replayed as MAX_REPLAY_GAP, ties and steps kept."""
    clock = ReplayClock(1.0, max_gap=60.0)
    due = [clock.due(t, now=0.0) for t in (10.0, 11.0, 1e300, math.inf, math.nan, -1.0, 1e9, 1e9 + 1, 1e9 + 1)]
    assert due == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 61.0, 62.0, 62.0]
    assert clock.gaps == 1
    assert ReplayClock(math.inf).due(1e9, now=5.0) == 5.0


def test_real_time_replay_of_damaged_stamps_finishes(tmp_path):
    """A candump log with 1e300 / inf stamps and a 1e9 s gap, replayed at 2000x: done in well under a minute."""
    path = tmp_path / "damaged.log"
    good = "120#E0306097F8FFE1FF"
    path.write_text("".join(f"({t}) can0 {good}\n" for t in ("100.0", "1e300", "inf", "100.01", "1e9", "1e9")))
    src = LogReplaySource(path, speed=2000.0)
    with deadline(20.0):
        got = _drain(src)
    assert len(got) == 6 and src.gaps_shortened == 1


def test_receive_filters_pass_only_the_ids_the_pack_config_uses():
    """can_filters from the used ids: a live bus hands over those frames only (11- and 29-bit kept apart)."""
    from bms_ai.can.sources import can_filters

    filters = can_filters([(0x120, False), (0x18DAF1DB, True), (0x120, False)])
    assert filters == [{"can_id": 0x120, "can_mask": 0x7FF, "extended": False},
                       {"can_id": 0x18DAF1DB, "can_mask": 0x1FFFFFFF, "extended": True}]
    src = open_source(interface="virtual", channel="src_filter_test", bus_options={"can_filters": filters})
    tx = can.Bus(interface="virtual", channel="src_filter_test")
    stop = threading.Event()
    try:
        it = src.frames(stop)
        assert next(it) is None
        for fid, ext in ((0x121, False), (0x120, True), (0x18DAF1DB, True), (0x120, False)):
            tx.send(can.Message(arbitration_id=fid, data=b"\x01", is_extended_id=ext))
        got = [next(m for m in it if m is not None) for _ in range(2)]
        assert [(m.arbitration_id, m.is_extended_id) for m in got] == [(0x18DAF1DB, True), (0x120, False)]
    finally:
        stop.set()
        tx.shutdown()
        src.close()


def test_a_replay_in_bursts_is_the_replay_frame_by_frame(tmp_path, messages):
    """Bursts hold the frames of a replay in order, none twice; at maximum speed at most MAX_BURST each."""
    from bms_ai.can.sources import MAX_BURST

    log = write_log(tmp_path / "d.blf", messages * 3)
    for lightweight in (False, True):
        src = LogReplaySource(log, speed=0.0, lightweight=lightweight)
        bursts = []
        for b in src.bursts(threading.Event()):
            if src.finished:
                break
            if b is not None:
                bursts.append(b)
        flat = [m for b in bursts for m in b]
        ref = _drain(LogReplaySource(log, speed=0.0, lightweight=lightweight))
        assert [(m.timestamp, m.arbitration_id, bytes(m.data)) for m in flat] == \
               [(m.timestamp, m.arbitration_id, bytes(m.data)) for m in ref]
        assert len(flat) == 3 * len(messages) and max(len(b) for b in bursts) <= MAX_BURST < len(flat)


@pytest.mark.parametrize("speed", [1.0, 7.5, math.inf])
def test_replay_clock_dues_of_a_chunk_equal_the_dues_frame_by_frame(speed):
    """Chunks of stamps with damaged ones, steps back, ties and long breaks: the same due times and gap count."""
    rng = np.random.default_rng(int(speed) if math.isfinite(speed) else 99)
    ts = 1000.0 + np.cumsum(rng.exponential(0.01, 3000))
    ts[rng.integers(0, 3000, 40)] -= rng.uniform(0, 2, 40)                  # steps back
    ts[1500:] += 500.0                                                      # a long break
    ts[2200:] += 61.0                                                       # just over MAX gap
    ts[rng.integers(0, 3000, 30)] = rng.choice([np.nan, np.inf, -5.0, 1e300], 30)  # damaged
    ts[700:703] = ts[699]                                                   # ties
    frame_by_frame, chunked = ReplayClock(speed, max_gap=60.0), ReplayClock(speed, max_gap=60.0)
    want = [frame_by_frame.due(float(t), now=3.0) for t in ts]
    got = np.concatenate([chunked.dues(ts[a:b], now=3.0) for a, b in ((0, 1), (1, 900), (900, 2201), (2201, 3000))])
    np.testing.assert_array_equal(got, want)
    assert chunked.gaps == frame_by_frame.gaps == (2 if math.isfinite(speed) else 0)


class _FakeClock:
    """Steady time that passes only while the replay waits (and by ``work`` per burst taken)."""

    def __init__(self) -> None:
        self.t = 50.0

    def monotonic(self) -> float:
        return self.t


class _FakeStop(threading.Event):
    def __init__(self, clock: _FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout=None) -> bool:
        self.clock.t += timeout or 0.0
        return self.is_set()


@pytest.mark.parametrize("speed,work", [(1.0, 0.0), (1.0, 0.03), (3.0, 0.2), (0.0, 0.0)])
def test_chunked_pacing_cuts_the_same_bursts_at_the_same_times(tmp_path, messages, monkeypatch, speed, work):
    """The light replay's per-chunk pacing gives the bursts frame-by-frame pacing gives, yielded at the same
    (fake) steady times, also when the consumer takes ``work`` seconds per burst; log loops and MAX_BURST cuts."""
    import bms_ai.can.sources as sources

    log = write_log(tmp_path / "d.blf", messages * 2)

    def run(lightweight: bool):
        clock = _FakeClock()
        monkeypatch.setattr(sources, "time", clock)
        src = LogReplaySource(log, speed=speed, loop=True, lightweight=lightweight)
        out = []
        for b in src.bursts(_FakeStop(clock)):
            if b is None:
                continue
            out.append((round(clock.t, 9), [(m.timestamp, m.arbitration_id, bytes(m.data)) for m in b]))
            clock.t += work
            if sum(len(x[1]) for x in out) > 5 * len(messages):
                break
        return out

    light, ref = run(True), run(False)
    assert [len(b) for _, b in light] == [len(b) for _, b in ref] and len(ref) > 3
    assert light == ref


@pytest.mark.parametrize("speed", [1.0, 3.0])
def test_paced_chunks_are_the_light_replay_with_its_due_times(tmp_path, messages, monkeypatch, speed):
    """A light real-time replay as chunks: the frames of the burst replay, looped forward, each with the (fake)
    steady time its burst is due at; None where the replay cannot be decoded vectorised."""
    import bms_ai.can.sources as sources

    span = messages[-1].timestamp - messages[0].timestamp + 0.001
    log = write_log(tmp_path / "d.blf", [can.Message(timestamp=m.timestamp + k * span, arbitration_id=m.arbitration_id,
                                                     data=m.data, is_extended_id=m.is_extended_id)
                                         for k in range(8) for m in messages])
    assert LogReplaySource(log, speed=speed).paced_chunks(threading.Event()) is None            # python-can frames
    assert LogReplaySource(log, speed=0.0, lightweight=True).paced_chunks(threading.Event()) is None  # batch
    asc = write_log(tmp_path / "d.asc", messages)
    assert LogReplaySource(asc, speed=speed, lightweight=True).paced_chunks(threading.Event()) is None
    monkeypatch.setattr(sources, "PACED_ROWS", 100)  # several chunks per pass (whole BLF containers)
    n = 20 * len(messages)

    clock = _FakeClock()
    monkeypatch.setattr(sources, "time", clock)
    src = LogReplaySource(log, speed=speed, loop=True, lightweight=True)
    frames, dues, sizes = [], [], []
    for chunk, due in src.paced_chunks(threading.Event()):
        assert len(due) == len(chunk)
        sizes.append(len(chunk))
        frames += [(m.timestamp, m.arbitration_id, bytes(m.data)) for m in chunk.frames()]
        dues += due.tolist()
        if len(frames) >= n:
            break
    ref, when = [], []
    clock = _FakeClock()
    monkeypatch.setattr(sources, "time", clock)
    src = LogReplaySource(log, speed=speed, loop=True, lightweight=True)
    for b in src.bursts(_FakeStop(clock)):
        if b is not None:
            ref += [(m.timestamp, m.arbitration_id, bytes(m.data)) for m in b]
            when += [clock.t] * len(b)
        if len(ref) >= n:
            break
    assert frames[:n] == ref[:n] and len(sizes) > 2 and max(sizes) < 8 * len(messages)
    stamps = [f[0] for f in frames[:n]]
    assert stamps[-1] - stamps[0] > 2.5 * 8 * span and min(np.diff(stamps)) >= 0  # looped forward
    # a burst goes out when its first frame is due, with the frames due within REPLAY_BURST_S after it
    lag = np.array(dues[:n]) - np.array(when[:n])
    assert lag.min() >= -0.002 and lag.max() <= sources.REPLAY_BURST_S + 0.002
    np.testing.assert_allclose(np.diff(dues[:n]), np.diff(stamps) / speed, atol=1e-9)
