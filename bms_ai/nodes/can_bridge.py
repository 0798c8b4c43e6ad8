"""can_bridge: CAN bus or log -> pack/measurements (BatteryState) + bus health on /diagnostics.

Frames are read on a thread (python-can is blocking); samples are taken at
fixed instants of CAN time (see bms_ai.can.sampler), so a replayed drive gives
the same messages at any speed. A steady-clock watchdog reports silence
(STALE within 1.1 x stale_after) even when the ROS clock is simulated and
paused, and keeps the samples going at rate_hz on the same grid of instants.

A log replay publishes losslessly and is paced by its readers (see
:meth:`CanBridgeNode._hold_for_readers`).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from pathlib import Path

import can
import numpy as np
from rclpy.clock import Clock, ClockType
from rclpy.duration import Duration
from rclpy.node import Node
from rosgraph_msgs.msg import Clock as ClockMsg
from sensor_msgs.msg import BatteryState

from bms_ai.can.assembler import PACK_LEVEL, PackAssembler, average_cell_sample
from bms_ai.can.decoder import PackDecoder
from bms_ai.can.frames import Frame, FrameArrays, stamps_ok
from bms_ai.can.health import (
    BusHealth,
    PollHealth,
    silence_sample_time,
    vehicle_bms_status,
    watchdog_delay,
    watchdog_period,
)
from bms_ai.can.isotp_offline import PollLogDecoder
from bms_ai.can.packconfig import load_pack_config
from bms_ai.can.sampler import FixedRateSampler
from bms_ai.can.sources import DUE_SLACK, SourceError, bus_options, can_filters, open_source
from bms_ai.can.uds import UdsPoller
from bms_ai.core.cdr import battery_state_bytes
from bms_ai.core.levels import WARN
from bms_ai.core.paths import default_pack_config
from bms_ai.nodes.common import GRAPH_SUB_QOS, LOSSLESS_QOS, PUB_QOS, Diagnostics, declare, spin_node
from bms_ai.nodes.convert import battery_fields, battery_fields_from_bytes, stamp_to_time, time_to_float
from bms_ai.nodes.local import LocalPublisher, LocalTopics, graph_subscription
from bms_ai.pack import PackSample

#: samples a replay may publish beyond what this process's readers have taken (< Fast DDS's 5000-sample
#: reader history: a full KEEP_ALL reader in the same process refuses samples and never gets them again)
READER_LEAD = 500
#: samples published between two waits until every matched reader has acknowledged them (readers in
#: other processes); the writer's history never fills, so publish() never blocks
ACK_WINDOW = 100


class CanBridgeNode(Node):
    """CAN frames in, fixed-rate BatteryState and bus-health diagnostics out."""

    def __init__(self, **kwargs) -> None:
        super().__init__(kwargs.pop("node_name", "can_bridge"), **kwargs)
        p = {
            "pack_config": declare(self, "pack_config", str(default_pack_config()), "pack config YAML (DBC signal map)"),
            "dbc": declare(self, "dbc", "", "DBC path overriding the pack config's"),
            "pack_id": declare(self, "pack_id", "", "hardware_id for diagnostics (default: pack config's)"),
            "interface": declare(self, "interface", "virtual", "python-can interface (socketcan, pcan, virtual, udp_multicast, ...)"),
            "channel": declare(self, "channel", "vcan0", "python-can channel"),
            "bus_options": declare(self, "bus_options", "{}", "extra python-can Bus kwargs as JSON, e.g. {\"bitrate\": 500000}"),
            "receive_filter": declare(self, "receive_filter", False,
                                      "live bus: receive only the ids the pack config uses (socketcan filters in the kernel)"),
            "can_log": declare(self, "can_log", "", "replay this CAN log (.asc .blf .log .trc .csv) instead of a bus"),
            "replay_speed": declare(self, "replay_speed", 1.0, "log replay speed factor; 0 = as fast as possible"),
            "replay_loop": declare(self, "replay_loop", False, "repeat the log"),
            "wait_for_subscribers": declare(self, "wait_for_subscribers", 0,
                                            "log replay starts once this many readers of pack/measurements are matched (max 10 s)"),
            "publish_clock": declare(self, "publish_clock", False, "publish /clock from CAN time (log replay on sim time)"),
            "time_source": declare(self, "time_source", "can", "'can': frame timestamps; 'clock': node clock at receipt"),
            "rate_hz": declare(self, "rate_hz", 10.0, "pack/measurements rate (instants on CAN time)"),
            "max_age": declare(self, "max_age", 1.0, "values older than this (s) are published as NaN"),
            "stale_after": declare(self, "stale_after", 0.5, "bus silence (s) after which diagnostics go STALE"),
            "frame_id": declare(self, "frame_id", "battery", "header.frame_id of published messages"),
            "raw_log_dir": declare(self, "raw_log_dir", "", "directory for a rotating raw BLF log of every frame ('' = off)"),
            "raw_log_max_bytes": declare(self, "raw_log_max_bytes", 50_000_000, "rotate the raw log at this size"),
        }
        self.p = p
        cfg = load_pack_config(p["pack_config"], dbc=p["dbc"] or None)
        self.pack_id = p["pack_id"] or cfg.pack_id
        self.cfg = cfg
        # what the cell voltages are: the pack's own, or the average cell of a pack-level config
        self.cell_data = PACK_LEVEL if cfg.pack_level else f"per cell ({cfg.n_cells})"
        self.asm = PackAssembler(PackDecoder(cfg))
        self.sampler = FixedRateSampler(self.asm, 1.0 / p["rate_hz"], p["max_age"])
        self.health = BusHealth(p["stale_after"])
        opts = bus_options(p["bus_options"])
        if p["receive_filter"] and not p["can_log"]:  # foreign frames then never reach Python (nor the counts)
            opts["can_filters"] = can_filters([*self.asm.decoder.routes, *self.asm.poll_ids])
        self.source = open_source(p["can_log"], interface=p["interface"], channel=p["channel"],
                                  bus_options=opts, speed=p["replay_speed"], loop=p["replay_loop"],
                                  lightweight=not p["raw_log_dir"] and p["time_source"] == "can")
        # values the car gives only on request: polled on a live bus, found in the frames of a replay
        self.poll: UdsPoller | PollLogDecoder | None = None
        if cfg.poll is not None:
            self.poll = (PollLogDecoder(cfg.poll, cfg.n_cells, cfg.n_temps) if self.source.replay
                         else UdsPoller(cfg.poll, cfg.n_cells, cfg.n_temps))
        self.poll_health = PollHealth()
        # a replay can wait for its readers; a live bus never does
        qos = LOSSLESS_QOS if self.source.replay else PUB_QOS
        # the graph's readers in this process take it on the publishing thread (bms_ai.nodes.local)
        self.pub = LocalPublisher(self, BatteryState, "pack/measurements", qos, local_first=True)
        # a replay's own reader of what it publishes, taken by the executor like every DDS reader in this
        # process; in a graph composed with local delivery every reader here takes it on this thread
        # (bms_ai.nodes.local), none can fall behind, and this reader would only wake the executor
        self._taken = threading.Condition()
        self.samples_taken = 0
        self._progress = (self.create_subscription(BatteryState, "pack/measurements", self._on_taken,
                                                   GRAPH_SUB_QOS, raw=True)
                          if self.source.replay and LocalTopics.of(self) is None else None)
        self.clock_pub = self.create_publisher(ClockMsg, "/clock", PUB_QOS) if p["publish_clock"] else None
        # the car's own BMS values (vehicle_bms), compared with our estimate on battery_state
        self.last_status: dict[str, float] = {}
        self.our_soc = math.nan
        if cfg.vehicle_bms:
            graph_subscription(self, BatteryState, "battery_state", self._on_estimate, GRAPH_SUB_QOS)
        self.diag = Diagnostics(self, self.pack_id)
        self.lock = threading.Lock()
        self.samples_published = 0
        self.source_errors = 0
        self.last_error = ""
        self.reader_failed = ""  # why the reader thread stopped for good ('' while it runs)
        self._damage_seen = 0
        self.last_rx_steady = math.nan
        self.last_rx_can = math.nan
        self._reported_silent = False  # what the last diagnostics said: bus silent (STALE)
        self._reported_late = False  # ... messages past their timeout (WARN)
        self._raw_log = None
        if p["raw_log_dir"]:
            Path(p["raw_log_dir"]).mkdir(parents=True, exist_ok=True)
            self._raw_log = can.SizedRotatingLogger(
                base_filename=str(Path(p["raw_log_dir"]) / "can_raw.blf"), max_bytes=int(p["raw_log_max_bytes"]))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="can_bridge_reader", daemon=True)
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.watchdog_tick = watchdog_period(p["rate_hz"], p["stale_after"])
        self.watchdog = self.create_timer(self.watchdog_tick, self._watchdog, clock=steady)
        self._diag_timer = self.create_timer(1.0, self._update_diagnostics, clock=steady)
        self._update_diagnostics()
        self._thread.start()
        self.get_logger().info(f"reading {self.source.description}, pack {self.pack_id} ({cfg.n_cells} cells, "
                               f"{self.cell_data})")

    # reader thread -------------------------------------------------------
    def _wait_for_readers(self) -> None:
        """A file replay would otherwise start before the graph's readers (and its own) are discovered."""
        end = time.monotonic() + 10.0
        own = self._progress is not None
        want = int(self.p["wait_for_subscribers"]) + own  # + the replay's own progress reader

        def matched() -> bool:
            return not own or self._progress.get_publisher_count() >= 1

        while not (matched() and self.pub.get_subscription_count() >= want) and time.monotonic() < end:
            if self._stop.wait(0.05):
                return
        if not matched():
            raise RuntimeError("the replay's progress reader did not match pack/measurements within 10 s")

    def _on_taken(self, _raw: bytes) -> None:
        with self._taken:
            self.samples_taken += 1
            self._taken.notify()

    def _hold_for_readers(self) -> bool:
        """Wait until the readers can take one more sample of a replay; False when stopped meanwhile.

        Lossless and never blocking inside DDS: (1) at most READER_LEAD samples
        beyond what the replay's own reader has taken. That reader is served by
        the executor one message per turn like every other reader in this
        process, so none of them falls further behind; Fast DDS delivers within
        a process by handing the sample over once, and a KEEP_ALL reader whose
        history is full (5000) refuses it for good (the writer then blocks,
        and publish() fails: the RCLError of long maximum-speed replays).
        Where the graph's readers here all take it locally, there is no such
        reader and no progress reader (``_progress`` None).
        (2) every ACK_WINDOW samples, all matched readers (other processes too)
        must have acknowledged, so the writer's history never fills and
        publish() never blocks in DDS (rclpy holds the GIL there: the readers
        in this process could not take anything meanwhile). Both waits poll
        with the GIL free. While held, the bus is not silent: the replay is
        paused, not the source.
        """
        n = self.samples_published
        if self._progress is not None:  # no lock per sample where every reader takes it locally
            with self._taken:
                while n - self.samples_taken >= READER_LEAD:
                    if self._stop.is_set():
                        return False
                    self._taken.wait(0.05)
                    self.last_rx_steady = time.monotonic()
        if n % ACK_WINDOW == 0:
            while not self.pub.wait_for_all_acked(Duration()):  # zero timeout: polled, the GIL stays free
                if self._stop.wait(0.002):
                    return False
                self.last_rx_steady = time.monotonic()
        return True

    def _run(self) -> None:
        """The reader thread: any failure ends up on /diagnostics as ERROR with its reason, never silently."""
        try:
            self._run_source()
        except Exception as exc:  # noqa: BLE001  (reported, not raised: the thread has no caller)
            with self.lock:
                self.reader_failed = f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"CAN reader stopped: {self.reader_failed}")
            self._update_diagnostics()
        finally:
            self._note_damage()

    def _run_source(self) -> None:
        if self.source.replay:
            self._wait_for_readers()
        chunks = self.source.frame_chunks()
        if chunks is not None:
            return self._run_batch(chunks)
        paced = self.source.paced_chunks(self._stop)
        if paced is not None:
            return self._run_paced(paced)
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._read()
                return
            except SourceError as exc:
                self.source_errors += 1
                self.last_error = str(exc)
                self.get_logger().error(f"{exc}; retrying in {backoff:.1f} s", throttle_duration_sec=5.0)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 10.0)

    def _note_damage(self) -> None:
        """A damaged log (cut short, corrupt) becomes the source's last error: ERROR once the frames stop."""
        errors = self.source.errors
        if len(errors) != self._damage_seen:
            self._damage_seen = len(errors)
            with self.lock:
                self.source_errors += 1
                self.last_error = errors[-1] if errors else self.last_error
            self.get_logger().error(f"CAN log damaged: {self.last_error}")

    def _read(self) -> None:
        """Frames burst by burst; without a poller, raw log or receipt stamps, a burst is fed under one lock."""
        use_clock = self.p["time_source"] == "clock"
        whole = self.poll is None and not use_clock and self._raw_log is None
        for burst in self.source.bursts(self._stop):
            if isinstance(self.poll, UdsPoller):
                self._bind_poller()
            if burst is None:
                self._note_damage()
                continue
            if whole:
                with self.lock:
                    samples = self.sampler.feed_burst(burst)
                    self.last_rx_steady = time.monotonic()
                    self.last_rx_can = self.asm.last_ts
                if not self._publish_samples(samples):
                    return
                continue
            for msg in burst:
                if not self._feed_frame(msg, use_clock):
                    return

    def _feed_frame(self, msg, use_clock: bool) -> bool:
        """One frame with its receipt stamp, raw log and poller; False when the replay was stopped."""
        if use_clock:
            msg.timestamp = time_to_float(self.get_clock().now().to_msg())
        if self._raw_log is not None:
            self._raw_log.on_message_received(msg)
        with self.lock:
            samples = self.sampler.feed_message(msg)
            self.last_rx_steady = time.monotonic()
            self.last_rx_can = self.asm.last_ts
        if not self._publish_samples(samples):
            return False
        if self.poll is not None:  # after the instants this frame closes: an answer counts from its own time
            self.poll.on_message(msg)
        return True

    def _publish_samples(self, samples: list[PackSample]) -> bool:
        """Publish in order (a replay held for its readers); False when stopped while held."""
        for s in samples:
            if self.source.replay and not self._hold_for_readers():
                return False
            self._publish(s)
        return True

    def _bind_poller(self) -> None:
        """Start the poller on the source's bus once it is open; follow it when the source reopens it."""
        bus = getattr(self.source, "bus", None)
        if bus is None or bus is self.poll.bus:
            return
        if self.poll.bus is None:
            self.poll.start(bus)
        else:
            self.poll.use_bus(bus)

    def _run_batch(self, chunks) -> None:
        """Maximum-speed replay: the log decoded vectorised chunk by chunk (identical samples, ~10x faster).

        Decoding runs off the lock (the watchdog and diagnostics never wait
        for it); publishing is lossless and paced by the readers
        (:meth:`_hold_for_readers`), so the replay runs as fast as the slowest
        reliable subscriber takes the samples.
        """
        for frames in chunks:
            polled = self._poll_frames(frames)
            table, decoded, carry = self.sampler.decode_arrays(frames)
            with self.lock:
                self.sampler.commit(table, decoded, carry)
            for s in table.samples():
                if self._stop.is_set() or not self._hold_for_readers():
                    return
                self._answer_polls(polled, s.stamp)
                self._publish(s)
                with self.lock:
                    self.last_rx_steady = time.monotonic()
                    self.last_rx_can = s.stamp
            if self._stop.is_set():
                return
            self._answer_polls(polled)
        self.source.finished = True

    def _run_paced(self, chunks) -> None:
        """Light real-time replay: each chunk decoded vectorised, each sample published when the frame
        that closes its instant is due (the samples frame-by-frame feeding gives, at ~10x less CPU).

        The sampler's state (values, counts, receive times) takes over a
        chunk once its last frame is due, so /diagnostics lags by up to a
        chunk but never reports frames before they are due; silence is
        measured from the latest frame due, as if it had been received.
        """
        for frames, due in chunks:
            out = np.maximum.accumulate(due)  # in order: a frame goes out after the ones before it
            latest = np.maximum.accumulate(np.where(stamps_ok(frames.ts), frames.ts, -np.inf))
            polled = self._poll_frames(frames)
            table, decoded, carry = self.sampler.decode_arrays(frames)
            # an instant is closed by the first frame stamped after it (stamps stepping back close none)
            closing = np.minimum(np.searchsorted(latest, table.t, side="right"), len(frames) - 1)
            for s, when in zip(table.samples(), out[closing].tolist()):
                if not self._wait_due(when, out, latest) or not self._hold_for_readers():
                    return
                self._answer_polls(polled, s.stamp)
                self._publish(s)
            if len(frames) and not self._wait_due(float(out[-1]), out, latest):
                return
            with self.lock:
                self.sampler.commit(table, decoded, carry)
            self._answer_polls(polled)
            self._note_damage()

    def _wait_due(self, target: float, out: np.ndarray, latest: np.ndarray) -> bool:
        """Wait until steady time ``target``, keeping the last receipt at the latest frame due; False when stopped.

        One wake-up per sample where the samples come faster than half of
        ``stale_after`` (a wake-up costs ~0.1-0.4 ms of CPU on a VM, more than
        the sample's own work), else often enough that frames due meanwhile
        keep the bus from looking silent.
        """
        step = max(0.5 * self.p["stale_after"], 0.01)
        while True:
            now = time.monotonic()
            i = int(np.searchsorted(out, now, side="right"))
            if i and out[i - 1] > -math.inf:
                with self.lock:
                    self.last_rx_steady = float(np.fmax(self.last_rx_steady, out[i - 1]))  # NaN before the first
                    if latest[i - 1] > -math.inf:
                        self.last_rx_can = float(latest[i - 1])
            if target - now <= DUE_SLACK:
                return not self._stop.is_set()
            if self._stop.wait(min(target - now, step)):
                return False

    def _answer_polls(self, polled: collections.deque, upto: float = math.inf) -> None:
        """The replayed poll answers stamped up to ``upto`` (an instant about to be published), as frame by frame."""
        while polled and polled[0].timestamp <= upto:
            self.poll.on_message(polled.popleft())

    def _poll_frames(self, frames: FrameArrays) -> collections.deque:
        """The chunk's frames on polled ids, in order (a few among thousands: picked vectorised)."""
        if not isinstance(self.poll, PollLogDecoder):
            return collections.deque()
        ids = np.fromiter(self.poll.ids, dtype=np.uint32, count=len(self.poll.ids))
        keep = np.flatnonzero(np.isin(frames.ids, ids) & ~frames.bad).tolist()
        return collections.deque(Frame(float(frames.ts[i]), int(frames.ids[i]),
                                       frames.data[i, :frames.dlc[i]].tobytes(), bool(frames.ext[i])) for i in keep)

    def _publish(self, s: PackSample) -> None:
        if self.poll is not None:
            self.poll.store.apply(s)
        self.last_status = s.status
        if self.cfg.pack_level:
            s = average_cell_sample(s, self.cfg.n_cells)
        if self.clock_pub is not None:
            self.clock_pub.publish(ClockMsg(clock=stamp_to_time(s.stamp)))
        f = battery_fields(s, self.p["frame_id"], self.pack_id)
        if self.cfg.pack_level:
            f.location = PACK_LEVEL  # the readers' cue: one average cell, not the pack's first cell
        self.pub.publish(battery_state_bytes(f))  # serialized here: no message object per sample
        self.samples_published += 1

    # watchdog (steady clock) ------------------------------------------------
    def silence(self) -> float:
        """Steady-clock seconds since the last frame (inf before the first)."""
        return time.monotonic() - self.last_rx_steady if math.isfinite(self.last_rx_steady) else math.inf

    def _watchdog(self) -> None:
        """Silence on the steady clock: the grid's instants go on at rate_hz, level changes go out at once.

        Silence samples are published under the lock, so a frame that ends the
        silence can only add instants after them (never before, never twice).
        After a replay, while a reader has not acknowledged everything, they
        wait for the next tick: a publish that blocks here would stall the
        executor (and every reader with it).
        """
        silence = self.silence()
        with self.lock:
            t = silence_sample_time(self.last_rx_can, silence, self.source.speed, self.p["stale_after"],
                                    self.source.replaying)
            if t is not None and (not self.source.replay or self.pub.wait_for_all_acked(Duration())):
                for s in self.sampler.close_until(t):
                    self._publish(s)
        if (silence > self.p["stale_after"]) != self._reported_silent or self._reported_late:
            self._update_diagnostics(periodic=False)
        self._schedule_watchdog()

    def _schedule_watchdog(self) -> None:
        """The next tick: at the sample rate while silent or late, else when silence could go STALE."""
        delay = (self.watchdog_tick if self._reported_late
                 else watchdog_delay(self.silence(), self.p["stale_after"], self.watchdog_tick))
        self.watchdog.timer_period_ns = int(delay * 1e9)
        self.watchdog.reset()  # from now: the next tick is ``delay`` away

    def _update_diagnostics(self, periodic: bool = True) -> None:
        """Assess and publish both checks; ``periodic``: the 1 Hz report (closes the rejection window)."""
        silence = self.silence()
        with self.lock:
            bus, messages = self.health.assess(
                self.sampler, source=self.source.description, silence=silence,
                samples_published=self.samples_published, source_errors=self.source_errors,
                last_error=self.last_error, reader_failed=self.reader_failed, closes_period=periodic,
                uncounted=self.last_rx_can > self.sampler.asm.last_ts)
        self._reported_silent = silence > self.p["stale_after"]
        self._reported_late = messages.level == WARN
        bus.values.update(cell_data=self.cell_data, cells_in_series=self.cfg.n_cells)
        with self.diag.batch():
            for st in (bus, messages):
                self.diag.update(st.check, st.level, st.message, st.values)
            if self.poll is not None:
                st = self.poll_health.assess(self.poll.store.stats, closes_period=periodic)
                self.diag.update(st.check, st.level, st.message, st.values)
            if self.cfg.vehicle_bms:
                st = vehicle_bms_status(self.cfg.vehicle_bms, self.last_status, self.our_soc)
                self.diag.update(st.check, st.level, st.message, st.values)

    def _on_estimate(self, data: bytes) -> None:
        self.our_soc = float(battery_fields_from_bytes(data).percentage)

    def destroy_node(self) -> None:
        """Stop the reader thread, then release the source and the raw log."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        if isinstance(self.poll, UdsPoller):
            self.poll.stop()
        self.source.close()
        if self._raw_log is not None:
            self._raw_log.stop()
        super().destroy_node()


NODE_CLASS = CanBridgeNode


def main(args: list[str] | None = None) -> None:
    """``ros2 run bms_ai can_bridge``."""
    spin_node(CanBridgeNode, args)


if __name__ == "__main__":
    main()
