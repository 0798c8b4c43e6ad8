"""Bus-health decisions: levels and values of the bridge's diagnostics, CAN time while the bus is silent."""

from __future__ import annotations

import math

import pytest
from testutil import synthetic_messages

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.health import (
    MIN_WATCHDOG_PERIOD,
    BusHealth,
    can_time_now,
    silence_sample_time,
    watchdog_delay,
    watchdog_period,
)
from bms_ai.can.sampler import FixedRateSampler
from bms_ai.core.levels import ERROR, OK, STALE, WARN


@pytest.fixture(scope="module")
def messages(decoder):
    """One second of the reference pack's traffic."""
    return synthetic_messages(decoder, 10.0, 11.0)


def _sampler(decoder, msgs=()) -> FixedRateSampler:
    s = FixedRateSampler(PackAssembler(decoder), 0.1)
    for m in msgs:
        s.feed_message(m)
    return s


def _assess(health, sampler, silence, errors=0, last_error=""):
    return health.assess(sampler, source="virtual:vcan0", silence=silence, samples_published=7,
                         source_errors=errors, last_error=last_error)


def test_silence_extrapolates_can_time_and_publishes_only_when_really_silent():
    """A silent bus keeps CAN time running in real time; a paused or timeless replay publishes nothing."""
    assert can_time_now(100.0, 2.0) == 102.0 and can_time_now(100.0, 2.0, speed=4.0) == 108.0
    assert silence_sample_time(100.0, 0.3, 1.0, stale_after=0.5, replaying=False) is None  # not silent yet
    assert silence_sample_time(100.0, 0.7, 1.0, 0.5, False) == pytest.approx(100.7)
    assert silence_sample_time(100.0, 0.7, 40.0, 0.5, False) == pytest.approx(100.7)  # after a 40x replay: 1x
    assert silence_sample_time(100.0, 0.7, 1.0, 0.5, replaying=True) is None  # readers catching up
    assert silence_sample_time(100.0, 0.7, math.inf, 0.5, False) is None  # maximum speed: no CAN clock
    assert silence_sample_time(math.nan, math.inf, 1.0, 0.5, False) is None  # nothing received yet


def test_bus_levels_from_silence_rejections_and_source_errors(decoder, messages):
    """STALE before traffic, OK while receiving, WARN once per batch of rejections, ERROR while failing."""
    health = BusHealth(stale_after=0.5)
    empty = _sampler(decoder)
    bus, msgs = _assess(health, empty, math.inf)
    assert (bus.check, bus.level, bus.message) == ("can_bus", STALE, "no CAN frame received yet")
    assert (msgs.check, msgs.level, msgs.message) == ("can_messages", STALE, "no traffic")
    bus, _ = _assess(health, empty, math.inf, errors=1, last_error="cannot open CAN bus x")
    assert bus.level == ERROR and bus.message == "CAN source failing: cannot open CAN bus x"

    sampler = _sampler(decoder, messages)
    bus, msgs = _assess(health, sampler, 0.01)
    assert (bus.level, bus.message) == (OK, "receiving") and msgs.level == OK
    sampler.asm.feed(0x7AB, b"\x01", 11.0)
    sampler.asm.feed(0x7AB, b"\x01", 11.0)
    bus, _ = _assess(health, sampler, 0.01)  # a shared bus: foreign ids are counted, not a fault
    assert (bus.level, bus.message) == (OK, "receiving")
    assert bus.values["unknown_ids"] == "0x7AB:2" and bus.values["frames_foreign"] == 2
    assert "rejected_unknown_id" not in bus.values and bus.values["frames_rejected"] == 0
    sampler.asm.feed(0x120, b"\x01", 11.0)  # a used id with the wrong length: damage
    sampler.asm.feed(0x120, b"\x01", 11.0)
    bus, _ = _assess(health, sampler, 0.01)
    assert (bus.level, bus.message) == (WARN, "2 frames rejected in the last period")
    assert _assess(health, sampler, 0.01)[0].level == OK  # no new rejections since
    bus, msgs = _assess(health, sampler, 2.0)
    assert (bus.level, bus.message, msgs.level) == (STALE, "CAN bus silent for 2.0 s", STALE)
    assert _assess(health, sampler, 2.0, errors=3, last_error="bus off")[0].level == ERROR
    assert _assess(health, sampler, 0.01, errors=3, last_error="bus off")[0].level == OK  # frames flow again


def test_values_and_per_message_timeouts(decoder, messages):
    """Counters go out as values; a message past its timeout (CAN time + silence) is named."""
    sampler = _sampler(decoder, messages)
    health = BusHealth(stale_after=0.5)
    bus, msgs = _assess(health, sampler, 0.0)
    v = bus.values
    assert v["source"] == "virtual:vcan0" and v["frames_accepted"] == len(messages) and v["frames_rejected"] == 0
    assert v["samples_published"] == 7 and v["samples_skipped_gaps"] == 0 and v["level_reason"] == "receiving"
    assert msgs.values["BMS_PackMeas.rate_hz"] == pytest.approx(100.0, rel=0.02)
    assert msgs.values["BMS_PackMeas.timeouts"] == 0
    _, msgs = _assess(health, sampler, 0.2)  # 200 ms: past PackMeas' 50 ms, within Status' 300 ms
    assert msgs.level == WARN and "BMS_PackMeas" in msgs.message and "BMS_Status" not in msgs.message
    assert msgs.values["BMS_PackMeas.timeouts"] == 1
    never = _assess(BusHealth(0.5), _sampler(decoder), 0.1)[1]
    assert never.message.startswith("timeout: BMS_PackMeas")  # nothing received: every message is late


def test_a_stopped_reader_is_error_with_its_reason_at_any_silence(decoder, messages):
    """A reader thread that died is ERROR naming the failure, not "no CAN frame received yet" or OK."""
    health = BusHealth(0.5)
    for sampler, silence in ((_sampler(decoder), math.inf), (_sampler(decoder, messages), 0.01)):
        bus, _ = health.assess(sampler, source="log:d.blf", silence=silence, samples_published=0, source_errors=0,
                               last_error="", reader_failed="FileNotFoundError: CAN log not found: d.blf")
        assert bus.level == ERROR and bus.message == "CAN reader stopped: FileNotFoundError: CAN log not found: d.blf"


def test_damaged_stamps_and_ids_are_reported_rejections(decoder, messages):
    """bad_time / bad_id rejections show in the values and make the bus WARN while they come."""
    sampler = _sampler(decoder, messages)
    health = BusHealth(0.5)
    _assess(health, sampler, 0.01)
    sampler.feed(0x120, bytes(8), 1e300)
    sampler.feed(-1, bytes(8), 11.5)
    bus, _ = _assess(health, sampler, 0.01)
    assert bus.level == WARN and bus.values["rejected_bad_time"] == 1 and bus.values["rejected_bad_id"] == 1


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_watchdog_ticks_every_instant_and_reports_stale_within_a_tenth_of_stale_after():
    """min(1/rate, stale_after/10): STALE lands at most one tick after stale_after (0.55 s at the defaults)."""
    assert watchdog_period(10.0, 0.5) == 0.05  # the defaults: 20 Hz, not 5 Hz
    assert watchdog_period(50.0, 0.5) == 0.02  # every instant of a 50 Hz stream
    assert watchdog_period(10.0, 2.0) == 0.1
    assert watchdog_period(1000.0, 0.01) == MIN_WATCHDOG_PERIOD  # never a busy timer


@pytest.mark.drive   # seconds: outside the fast library tier
def test_watchdog_sleeps_while_frames_flow_and_ticks_once_silent():
    """Frames flowing: the next tick is when silence could reach stale_after, plus one tick (STALE stays
    within stale_after + tick of the last frame); silent or before the first frame: every tick."""
    assert watchdog_delay(0.01, 0.5, 0.05) == pytest.approx(0.54)
    assert 0.5 < 0.2 + watchdog_delay(0.2, 0.5, 0.05) <= 0.55  # silence at the next tick
    assert watchdog_delay(0.5, 0.5, 0.05) == 0.05
    assert watchdog_delay(3.0, 0.5, 0.05) == 0.05
    assert watchdog_delay(float("inf"), 0.5, 0.05) == 0.05
    health = BusHealth(stale_after=0.5)
    period = watchdog_period(10.0, 0.5)
    for phase in (0.0, 0.013, 0.037, 0.049):  # where the last frame falls between two ticks
        ticks = [phase + period * i for i in range(40)]
        first = next(t for t in ticks if _assess(health, _sampler_empty(), t)[0].level == STALE)
        assert 0.5 < first <= 0.5 + period + 1e-9


def _sampler_empty():
    from bms_ai.can.decoder import PackDecoder
    from bms_ai.can.packconfig import load_pack_config
    from bms_ai.core.paths import default_pack_config

    return _sampler(PackDecoder(load_pack_config(default_pack_config())))


def test_warns_after_a_bus_gap_clear_once_every_message_is_back(decoder):
    """Silence is STALE; resumed traffic names the messages still missing, then OK once all are back."""
    health = BusHealth(stale_after=0.5)
    sampler = _sampler(decoder, synthetic_messages(decoder, 10.0, 11.0))
    assert _assess(health, sampler, 0.01)[1].level == OK
    bus, msgs = _assess(health, sampler, 3.0)  # a 3 s gap
    assert (bus.level, msgs.level) == (STALE, STALE)
    for m in synthetic_messages(decoder, 14.0, 14.2):  # PackMeas comes back first
        if m.arbitration_id == 0x120:
            sampler.feed_message(m)
    bus, msgs = _assess(health, sampler, 0.001)
    assert bus.level == OK and msgs.level == WARN and "BMS_Status" in msgs.message
    assert "BMS_PackMeas" not in msgs.message
    for m in synthetic_messages(decoder, 14.2, 15.0):  # then every message
        sampler.feed_message(m)
    bus, msgs = _assess(health, sampler, 0.001)
    assert (bus.level, bus.message, msgs.level, msgs.message) == (OK, "receiving", OK, "all messages within timeout")
    assert msgs.values["BMS_PackMeas.timeouts"] == 1 and msgs.values["BMS_Status.timeouts"] == 1  # once per gap
    assert _assess(health, sampler, 0.001)[1].level == OK  # and stays OK


def test_an_interim_assessment_leaves_the_rejection_window_open(decoder, messages):
    """Level changes between reports (silence ending, a timeout clearing) never shorten a WARN for rejections."""
    health = BusHealth(0.5)
    sampler = _sampler(decoder, messages)
    _assess(health, sampler, 0.01)
    sampler.asm.feed(0x120, b"\x01", 11.0)  # a used id with the wrong length
    interim = health.assess(sampler, source="s", silence=0.01, samples_published=0, source_errors=0,
                            last_error="", closes_period=False)[0]
    assert interim.level == WARN
    assert _assess(health, sampler, 0.01)[0].level == WARN  # the periodic report still sees them
    assert _assess(health, sampler, 0.01)[0].level == OK


def test_vehicle_bms_status_shows_the_cars_values_and_the_soc_agreement():
    """STALE until the car gave a value; then OK with its values and its SOC minus ours in points."""
    from bms_ai.can.health import vehicle_bms_status

    keys = {"soc": "vehicle_bms.soc", "soh": "soh"}
    st = vehicle_bms_status(keys, {}, 0.5)
    assert (st.check, st.level) == ("vehicle_bms", STALE) and math.isnan(st.values["soc_difference_points"])
    st = vehicle_bms_status(keys, {"vehicle_bms.soc": 58.5, "soh": 97.5}, 0.55)
    assert st.level == OK and st.values["soc"] == 58.5 and st.values["soh"] == 97.5
    assert st.values["soc_difference_points"] == pytest.approx(3.5)
    assert st.message == "soc 58.5, soh 97.5; ours 55.0 % (+3.5 points)"
    assert math.isnan(vehicle_bms_status(keys, {"soh": 97.5}).values["soc_difference_points"])  # no estimate yet
