"""UDS / ISO-TP polling: layout decode, rejections, reassembly from logs, and a live poller against a simulated BMS."""

from __future__ import annotations

import collections

import can
import numpy as np
import pytest

from bms_ai.can.frames import FrameArrays
from bms_ai.can.isotp_offline import PollLogDecoder, Reassembler, decode_poll_log, isotp_messages
from bms_ai.can.packconfig import parse_poll_config
from bms_ai.can.uds import PollStore, UdsPoller, decode_values
from bms_ai.pack import PackSample

pytest.importorskip("isotp", reason="can-isotp is not installed (./dev.sh installs it from setup.py)")
pytest.importorskip("udsoncan", reason="udsoncan is not installed (./dev.sh installs it from setup.py)")

from ecu_sim import KONA_CELLS, KONA_TEMPS, SimEcu, kona_cells, kona_data, kona_poll  # noqa: E402
from testutil import realdata, wait_for  # noqa: E402


def _poll(**kw):
    return parse_poll_config(kona_poll(**kw), KONA_CELLS, KONA_TEMPS)


def _req(poll, did):
    return next(r for r in poll.requests if r.did == did)


# ----------------------------------------------------------------------------- layout and answers

def test_layout_decodes_sizes_byte_orders_signs_and_valid_ranges():
    """Every integer shape a BMS page uses, scaled; readings outside the valid range become NaN."""
    poll = parse_poll_config({"requests": [{"request_id": 0x79B, "response_id": 0x7BB, "service": 0x21, "did": 2,
                                            "period": 1, "values": {
                                                "be16": {"start": 0, "count": 2, "bytes": 2, "scale": 0.001,
                                                         "valid": [0, 4.999]},
                                                "le16s": {"start": 4, "bytes": 2, "byteorder": "little", "signed": True},
                                                "u24": {"start": 6, "bytes": 3, "offset": -40}}}]})
    req = poll.requests[0]
    assert req.payload == b"\x21\x02" and req.header == b"\x61\x02"
    data = (3712).to_bytes(2, "big") + (5100).to_bytes(2, "big") + (-2).to_bytes(2, "little", signed=True) + b"\x00\x01\x00"
    values, reason = decode_values(req, data)
    assert reason is None
    assert values["be16"][0] == pytest.approx(3.712) and np.isnan(values["be16"][1])  # 5.1 V: Leaf's "no reading"
    assert values["le16s"].tolist() == [-2.0] and values["u24"].tolist() == [256 - 40]
    assert decode_values(req, data[:8]) == (None, "short")


def test_answers_negative_malformed_short_and_pending_are_counted_never_raised():
    """Each bad answer is a counted rejection with a reason; a pending answer only asks for more time."""
    poll = _poll()
    store = PollStore(poll, KONA_CELLS, KONA_TEMPS)
    r2 = _req(poll, 0x0102)
    data = kona_data(kona_cells())
    assert store.answer(r2, b"\x62\x01\x02" + data[0x0102], 5.0) is True
    assert store.answer(r2, b"\x7f\x22\x31", 5.1) is False
    assert store.answer(r2, b"\x7f\x22\x78", 5.2) is None
    assert store.answer(r2, b"\x62\x01", 5.3) is False
    assert store.answer(r2, b"\x62\x01\x02\xff", 5.4) is False
    assert store.answer(r2, b"\x62\x01\x03" + data[0x0103], 5.5) is False
    assert store.answer(r2, b"", 5.6) is False
    s = store.stats
    assert s.answers == {r2.name: 1} and s.pending == 1
    assert s.rejected == {"negative:RequestOutOfRange": 1, "malformed": 2, "short": 1, "wrong_answer": 1}
    cells, stamps = store.latest()["cell_voltages"]
    np.testing.assert_allclose(cells[:32], kona_cells()[:32])
    assert np.isnan(cells[32:]).all() and stamps[0] == 5.0


def test_store_fills_a_pack_sample_from_several_pages():
    """Four pages fill the 98 cells; scalars become status values; newer broadcast values are kept."""
    poll = _poll()
    store = PollStore(poll, KONA_CELLS, KONA_TEMPS)
    data = kona_data(kona_cells())
    for r in poll.requests:
        assert store.answer(r, r.header + data[r.did], 10.0)
    s = PackSample.empty(KONA_CELLS, KONA_TEMPS)
    s.cell_temperatures[0], s.cell_temperature_stamps[0] = 30.0, 11.0  # newer than the poll
    store.apply(s)
    np.testing.assert_allclose(s.cell_voltages, kona_cells())
    assert s.cell_temperatures.tolist() == [30.0, 22.0, 23.0, -4.0]
    assert s.status["soh"] == pytest.approx(97.5) and s.status["soc_display"] == 58.5
    assert s.status["bms_current"] == pytest.approx(-12.3) and s.status["bms_voltage"] == pytest.approx(360.5)


# ----------------------------------------------------------------------------- ISO-TP reassembly from logs

def test_reassembly_single_first_consecutive_and_damage():
    """Single and multi-frame messages rebuild; flow control is skipped; damage is counted and dropped."""
    r = Reassembler()
    assert r.feed(bytes.fromhex("0362010200000000")) == bytes.fromhex("620102")
    assert r.feed(bytes.fromhex("100a620102aabbcc")) is None
    assert r.feed(bytes.fromhex("300000")) is None
    assert r.feed(bytes.fromhex("21ddeeff11aaaaaa")) == bytes.fromhex("620102aabbccddeeff11")
    assert r.feed(bytes.fromhex("21ddeeff11")) is None  # no first frame before it
    assert r.feed(bytes.fromhex("100a620102aabbcc")) is None
    assert r.feed(bytes.fromhex("22ddeeff11")) is None  # sequence 2 where 1 was due
    assert r.feed(bytes.fromhex("100a620102aabbcc")) is None
    assert r.feed(bytes.fromhex("0162")) == b"\x62"  # interrupts the message in progress
    assert r.feed(bytes.fromhex("0762")) is None and r.feed(b"") is None and r.feed(b"\xf0") is None
    assert r.feed(bytes.fromhex("1003620102aabbcc")) is None  # a first frame for 3 bytes
    assert r.errors == {"unexpected_consecutive": 1, "wrong_sequence": 1, "interrupted": 1, "bad_length": 2,
                        "empty_frame": 1, "bad_pci": 1}
    assert r.flow_control == 1


def _exchange_frames(poll, data, t0=100.0):
    """The frames of one poll round as a scan tool records them (request, first frame, flow control, CFs)."""
    out = []
    t = t0
    for r in poll.requests:
        out.append(can.Message(timestamp=t, arbitration_id=r.request_id, is_extended_id=False,
                               data=bytes([len(r.payload)]) + r.payload + b"\xaa" * (7 - len(r.payload))))
        payload = r.header + data[r.did]
        n = len(payload)
        frames = [bytes([0x10 | n >> 8, n & 0xFF]) + payload[:6]]
        rest, seq = payload[6:], 1
        while rest:
            frames.append(bytes([0x20 | seq]) + rest[:7].ljust(7, b"\xaa"))
            rest, seq = rest[7:], (seq + 1) & 0x0F
        out.append(can.Message(timestamp=t + 0.001, arbitration_id=r.response_id, data=frames[0], is_extended_id=False))
        out.append(can.Message(timestamp=t + 0.002, arbitration_id=r.request_id, data=b"\x30\x00\x00", is_extended_id=False))
        for k, f in enumerate(frames[1:]):
            out.append(can.Message(timestamp=t + 0.003 + 0.001 * k, arbitration_id=r.response_id, data=f,
                                   is_extended_id=False))
        out.append(can.Message(timestamp=t + 0.05, arbitration_id=0x595, data=bytes(8), is_extended_id=False))
        t += 0.2
    return out


def test_recorded_poll_round_decodes_from_messages_and_frame_arrays():
    """A recorded poll round gives the 98 cells, from python-can messages and from the project's arrays alike."""
    poll = _poll()
    msgs = _exchange_frames(poll, kona_data(kona_cells()))
    a, answers = decode_poll_log(msgs, poll, KONA_CELLS, KONA_TEMPS)
    b, _ = decode_poll_log(FrameArrays.from_messages(msgs), poll, KONA_CELLS, KONA_TEMPS)
    for store in (a, b):
        cells, stamps = store.latest()["cell_voltages"]
        np.testing.assert_allclose(cells, kona_cells())
        assert store.stats.rejected == {} and store.stats.sent == {r.name: 1 for r in poll.requests}
        assert stamps[0] == pytest.approx(100.2 + 0.003 + 0.004)  # the time of the answer's last frame
    assert [x.request for x in answers] == [r.name for r in poll.requests]
    one, split = PollLogDecoder(poll, KONA_CELLS, KONA_TEMPS), PollLogDecoder(poll, KONA_CELLS, KONA_TEMPS)
    for m in msgs:  # a replay loop, frame by frame
        one.on_message(m)
    split.feed(FrameArrays.from_messages(msgs[:7]))  # chunks that cut a multi-frame answer in two
    split.feed(FrameArrays.from_messages(msgs[7:]))
    for dec in (one, split):
        np.testing.assert_array_equal(dec.store.latest()["cell_voltages"][0], a.latest()["cell_voltages"][0])
    split.feed([can.Message(arbitration_id=0x7EC, data=bytes.fromhex("21aabb"), is_extended_id=False)])
    assert split.store.stats.rejected == {"isotp:unexpected_consecutive": 1}
    np.testing.assert_allclose(answers[1].values["cell_voltages"], kona_cells()[:32])


# ----------------------------------------------------------------------------- live polling against a simulated BMS

@pytest.fixture
def channel(request):
    return f"uds-{request.node.name}"


def _client(channel, poll, recorder=False):
    bus = can.Bus(interface="virtual", channel=channel)
    notifier = can.Notifier(bus, [], timeout=0.01)
    rec = None
    if recorder:  # a second node on the bus that records everything, like a logger in the car
        rec_bus, reader = can.Bus(interface="virtual", channel=channel), can.BufferedReader()
        rec = (rec_bus, reader, can.Notifier(rec_bus, [reader], timeout=0.01))
    poller = UdsPoller(poll, KONA_CELLS, KONA_TEMPS, tick=0.002)
    poller.start(bus, notifier)
    return poller, bus, notifier, rec


def _close(poller, bus, notifier, rec=None):
    poller.stop()
    notifier.stop()
    bus.shutdown()
    if rec:
        rec[2].stop()
        rec[0].shutdown()


def test_live_poll_reads_every_cell_one_request_at_a_time_and_matches_the_recording(channel):
    """The poller reads the sim BMS's 98 cells; the ECU never sees two requests in flight, the gaps
    between requests are at least min_gap, and the recorded traffic decodes to the same values."""
    poll = _poll(period=5.0, min_gap=0.03)
    ecu = SimEcu(channel, kona_data(kona_cells()), delay=0.005)
    poller, bus, notifier, rec = _client(channel, poll, recorder=True)
    try:
        assert wait_for(lambda: sum(poller.stats.answers.values()) >= 5, 5.0), poller.stats.as_dict()
    finally:
        _close(poller, bus, notifier)
        ecu.close()
    frames = []
    while (m := rec[1].get_message(0)) is not None:
        frames.append(m)
    rec[2].stop()
    rec[0].shutdown()
    live = poller.latest()
    np.testing.assert_allclose(live["cell_voltages"][0], kona_cells())
    assert live["soh"][0] == pytest.approx(97.5) and live["cell_temperatures"][0].tolist() == [21, 22, 23, -4]
    assert ecu.overlaps == 0 and poller.stats.rejected == {} and poller.stats.timeouts == {}
    times = [t for t, _ in ecu.requests]
    assert len(times) == 5 and min(np.diff(times)) >= 0.03 - 1e-3
    offline, _ = decode_poll_log(frames, poll, KONA_CELLS, KONA_TEMPS)
    off = offline.latest()
    for name, (value, stamp) in live.items():
        np.testing.assert_array_equal(off[name][0], value)
        np.testing.assert_array_equal(off[name][1], stamp)


def test_silent_ecu_times_out_and_negative_answers_are_counted(channel):
    """No answer within the timeout is counted per request; a negative answer is a counted rejection."""
    poll = parse_poll_config({"min_gap": 0.0, "timeout": 0.1, "requests": kona_poll(period=0.2)["requests"][1:3]},
                             KONA_CELLS, KONA_TEMPS)
    ecu = SimEcu(channel, kona_data(kona_cells()))
    ecu.silent = True
    poller, bus, notifier, _ = _client(channel, poll)
    try:
        assert wait_for(lambda: sum(poller.stats.timeouts.values()) >= 2, 3.0)
        ecu.negative[0x0103] = 0x22  # conditionsNotCorrect
        ecu.pending_first.add(0x0102)
        ecu.silent = False
        assert wait_for(lambda: poller.stats.rejected.get("negative:ConditionsNotCorrect", 0) >= 1
                        and poller.stats.answers.get(_req(poll, 0x0102).name, 0) >= 1, 3.0), poller.stats.as_dict()
    finally:
        _close(poller, bus, notifier)
        ecu.close()
    assert poller.stats.pending >= 1
    assert "no answer within 0.1 s" in poller.stats.last_error or "ConditionsNotCorrect" in poller.stats.last_error
    np.testing.assert_allclose(poller.latest()["cell_voltages"][0][:32], kona_cells()[:32])


def test_rate_limit_one_request_in_flight_and_min_gap_by_the_clock_given():
    """With an explicit clock: nothing is sent while a request is in flight, nor within min_gap after it ends."""
    poll = parse_poll_config({"min_gap": 0.05, "timeout": 1.0, "requests": kona_poll(period=0.5)["requests"][:2]},
                             KONA_CELLS, KONA_TEMPS)
    bus = can.Bus(interface="virtual", channel="uds-rate", receive_own_messages=True)
    poller = UdsPoller(poll, KONA_CELLS, KONA_TEMPS, clock=lambda: 0.0).start(bus, thread=False)
    try:
        assert poller.poll_once(0.0) == 1
        assert [poller.poll_once(t) for t in (0.1, 0.5, 1.0)] == [0, 0, 0]  # in flight until the timeout
        assert poller.poll_once(1.01) == 0 and poller.stats.timeouts == {poll.requests[0].name: 1}
        assert poller.poll_once(1.05) == 0  # min_gap after the timeout
        assert poller.poll_once(1.07) == 1  # the other, more overdue request
        sent = []
        while (m := bus.recv(0)) is not None:
            sent.append(m)
        assert [m.data.hex() for m in sent] == ["03220101aaaaaaaa", "03220102aaaaaaaa"]
        assert all(m.arbitration_id == 0x7E4 for m in sent)
    finally:
        bus.shutdown()


def test_frames_of_other_ids_cost_nothing_and_the_queue_is_bounded():
    """Broadcast frames are not queued; a flood on the response id is dropped past the bound and counted."""
    from bms_ai.can.uds import RX_QUEUE_FRAMES

    poller = UdsPoller(_poll(), KONA_CELLS, KONA_TEMPS)
    other = can.Message(arbitration_id=0x595, data=bytes(8), is_extended_id=False)
    flood = can.Message(arbitration_id=0x7EC, data=b"\x21" + bytes(7), is_extended_id=False)
    for _ in range(10):
        poller.on_message(other)
    for _ in range(RX_QUEUE_FRAMES + 5):
        poller.on_message(flood)
    assert len(poller.ecus[0].rx) == RX_QUEUE_FRAMES and poller.stats.rejected == {"rx_overflow": 5}


# ----------------------------------------------------------------------------- the real Kona diagnostic log

def test_real_kona_obd_scan_reassembles_and_decodes():
    """The 2021 Kona's BMS on 0x7EC: multi-frame Mode 09 answers spell its calibration id and name; a
    polled OBD PID decodes by the layout; its negative answers name the code; no reassembly damage."""
    path = realdata("kona/dcan-obd-scanner.gvret.csv")
    from bms_ai.can.logs import read_log
    from bms_ai.can.uds import nrc_name

    frames = read_log(path)
    assert frames.error is None and len(frames) == 1845
    damage: collections.Counter = collections.Counter()
    msgs = list(isotp_messages(frames, {0x7EC}, damage))
    assert damage == {}
    texts = {m.payload[:2]: m.payload[3:].rstrip(b"\x00").decode() for m in msgs if m.payload[:1] == b"\x49"}
    assert texts == {b"\x49\x02": "OSEV__ BMS ", b"\x49\x04": "OSEVB6822R", b"\x49\x0a": "BECM-B+EnergyCtrl"}
    negatives = [m.payload for m in msgs if m.payload[:1] == b"\x7f"]
    assert negatives == [b"\x7f\x18\x11"] * 7 and nrc_name(0x11) == "ServiceNotSupported"
    poll = parse_poll_config({"requests": [
        {"request_id": 0x7E4, "response_id": 0x7EC, "service": 0x01, "did": 0x00, "period": 1,
         "values": {"pids_01_20": {"start": 0, "bytes": 4}}},
        {"request_id": 0x7E4, "response_id": 0x7EC, "service": 0x09, "did": 0x04, "period": 60,
         "values": {"calibration_ids": {"start": 0}}}]})
    store, answers = decode_poll_log(frames, poll)
    latest = store.latest()
    assert latest["pids_01_20"][0] == 0x80000001  # PIDs 0x01 and 0x20 supported
    assert latest["calibration_ids"][0] == 1
    assert len(answers) == 323 and store.stats.rejected == {}
    last = [a for a in answers if a.request == poll.requests[0].name][-1]
    assert latest["pids_01_20"][1] == last.stamp and last.values["pids_01_20"].tolist() == [0x80000001]
