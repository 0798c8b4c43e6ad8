"""can_bridge: CAN bus or log -> pack/measurements (BatteryState) + bus health on /diagnostics.

Frames are read on a thread (python-can is blocking); samples are taken at
fixed instants of CAN time (see bms_ai.can.sampler), so a replayed drive gives
the same messages at any speed. A steady-clock watchdog reports silence
(STALE within 1 s) even when the ROS clock is simulated and paused.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import can
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rosgraph_msgs.msg import Clock as ClockMsg
from sensor_msgs.msg import BatteryState

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.decoder import PackDecoder
from bms_ai.can.offline import decode_frames, read_log, sample, sample_times
from bms_ai.can.packconfig import load_pack_config
from bms_ai.can.sampler import FixedRateSampler
from bms_ai.can.sources import BusSource, LogReplaySource, SourceError
from bms_ai.core.levels import ERROR, OK, STALE, WARN
from bms_ai.core.paths import default_pack_config
from bms_ai.nodes.common import LOSSLESS_QOS, PUB_QOS, Diagnostics, declare, spin_node
from bms_ai.nodes.convert import sample_to_battery_state, stamp_to_time
from bms_ai.pack import PackSample


class CanBridgeNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__(kwargs.pop("node_name", "can_bridge"), **kwargs)
        p = {
            "pack_config": declare(self, "pack_config", str(default_pack_config()), "pack config YAML (DBC signal map)"),
            "dbc": declare(self, "dbc", "", "DBC path overriding the pack config's"),
            "pack_id": declare(self, "pack_id", "", "hardware_id for diagnostics (default: pack config's)"),
            "interface": declare(self, "interface", "virtual", "python-can interface (socketcan, pcan, virtual, udp_multicast, ...)"),
            "channel": declare(self, "channel", "vcan0", "python-can channel"),
            "bus_options": declare(self, "bus_options", "{}", "extra python-can Bus kwargs as JSON, e.g. {\"bitrate\": 500000}"),
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
        self.asm = PackAssembler(PackDecoder(cfg))
        self.sampler = FixedRateSampler(self.asm, 1.0 / p["rate_hz"], p["max_age"])
        lossless = bool(p["can_log"])  # a file can wait for its readers; a live bus never does
        self.pub = self.create_publisher(BatteryState, "pack/measurements", LOSSLESS_QOS if lossless else PUB_QOS)
        self.clock_pub = self.create_publisher(ClockMsg, "/clock", PUB_QOS) if p["publish_clock"] else None
        self.diag = Diagnostics(self, self.pack_id)
        self.source = self._make_source()
        self.lock = threading.Lock()
        self.samples_published = 0
        self.source_errors = 0
        self.last_error = ""
        self.last_rx_steady = math.nan
        self.last_rx_can = math.nan
        self._last_rejected = 0
        self._raw_log = None
        if p["raw_log_dir"]:
            Path(p["raw_log_dir"]).mkdir(parents=True, exist_ok=True)
            self._raw_log = can.SizedRotatingLogger(
                base_filename=str(Path(p["raw_log_dir"]) / "can_raw.blf"), max_bytes=int(p["raw_log_max_bytes"]))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="can_bridge_reader", daemon=True)
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.watchdog = self.create_timer(0.2, self._watchdog, clock=steady)  # silence -> STALE well within 1 s
        self._diag_timer = self.create_timer(1.0, self._update_diagnostics, clock=steady)
        self._update_diagnostics()
        self._thread.start()
        self.get_logger().info(f"reading {self.source.description}, pack {self.pack_id} ({cfg.n_cells} cells)")

    def _make_source(self):
        p = self.p
        if p["can_log"]:
            return LogReplaySource(p["can_log"], speed=p["replay_speed"], loop=p["replay_loop"],
                                   lightweight=not p["raw_log_dir"] and p["time_source"] == "can")
        try:
            opts = json.loads(p["bus_options"] or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"parameter bus_options is not JSON: {exc}") from exc
        return BusSource(p["interface"], p["channel"], **opts)

    # reader thread -------------------------------------------------------
    def _wait_for_readers(self) -> None:
        """A file replay would otherwise start before the graph's readers are discovered."""
        end = time.monotonic() + 10.0
        want = int(self.p["wait_for_subscribers"])
        while self.pub.get_subscription_count() < want and time.monotonic() < end:
            if self._stop.wait(0.05):
                return

    def _run(self) -> None:
        if isinstance(self.source, LogReplaySource):
            self._wait_for_readers()
        if (isinstance(self.source, LogReplaySource) and self.source.speed == math.inf and not self.source.loop
                and self._raw_log is None and self.p["time_source"] == "can"):
            return self._run_batch()
        backoff = 0.5
        use_clock = self.p["time_source"] == "clock"
        while not self._stop.is_set():
            try:
                for msg in self.source.frames(self._stop):
                    if msg is None:
                        continue
                    if use_clock:
                        msg.timestamp = self.get_clock().now().nanoseconds * 1e-9
                    if self._raw_log is not None:
                        self._raw_log.on_message_received(msg)
                    with self.lock:
                        samples = self.sampler.feed_message(msg)
                        self.last_rx_steady = time.monotonic()
                        self.last_rx_can = self.asm.last_ts
                    for s in samples:
                        self._publish(s)
                    backoff = 0.5
                return
            except SourceError as exc:
                self.source_errors += 1
                self.last_error = str(exc)
                self.get_logger().error(f"{exc}; retrying in {backoff:.1f} s", throttle_duration_sec=5.0)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 10.0)

    def _run_batch(self) -> None:
        """Maximum-speed replay: the whole log decoded vectorised (identical samples, ~10x faster).

        Publishing is lossless (KEEP_ALL), so the replay runs as fast as the
        slowest reliable subscriber takes the samples.
        """
        src: LogReplaySource = self.source
        frames = read_log(src.path)
        if frames.error:
            src.errors.append(frames.error)
        with self.lock:
            decoded = decode_frames(frames, self.asm.decoder)
            table = sample(decoded, sample_times(decoded.t_first, decoded.t_last, self.sampler.period,
                                                 decoded.frame_ts), self.sampler.max_age)
            c = self.asm.counters
            c.accepted += decoded.accepted
            for k, v in decoded.rejected.items():
                c.rejected[k] += v
            self.asm.last_ts = decoded.t_last
        base = PackSample.empty(table.cell_voltages.shape[1], table.cell_temperatures.shape[1])
        for i in range(len(table)):
            if self._stop.is_set():
                return
            s = base.copy()
            s.stamp = float(table.t[i])
            s.pack_voltage, s.pack_current = float(table.pack_voltage[i]), float(table.pack_current[i])
            s.cell_voltages[:] = table.cell_voltages[i]
            s.cell_temperatures[:] = table.cell_temperatures[i]
            s.status = {k: float(v[i]) for k, v in table.status.items()}
            self._publish(s)
            with self.lock:
                self.last_rx_steady = time.monotonic()
                self.last_rx_can = s.stamp
        src.finished = True

    def _publish(self, s: PackSample) -> None:
        if self.clock_pub is not None:
            self.clock_pub.publish(ClockMsg(clock=stamp_to_time(s.stamp)))
        self.pub.publish(sample_to_battery_state(s, self.p["frame_id"], self.pack_id))
        self.samples_published += 1

    # watchdog (steady clock) ------------------------------------------------
    def silence(self) -> float:
        return time.monotonic() - self.last_rx_steady if math.isfinite(self.last_rx_steady) else math.inf

    def _watchdog(self) -> None:
        silent = self.silence()
        replaying = isinstance(self.source, LogReplaySource) and not self.source.finished
        if (silent > self.p["stale_after"] and math.isfinite(silent) and math.isfinite(self.source_speed())
                and not replaying):  # a paused replay (readers catching up) is not a silent bus
            # keep publishing at the nominal rate; values age out to NaN
            with self.lock:
                now_can = self.last_rx_can + silent * self.source_speed()
                s = self.asm.snapshot(now_can, self.p["max_age"])
            s.stamp = now_can
            self._publish(s)
        if silent > self.p["stale_after"]:
            self._update_diagnostics()

    def source_speed(self) -> float:
        if isinstance(self.source, LogReplaySource):
            return self.source.speed
        return 1.0

    def _update_diagnostics(self) -> None:
        with self.lock:
            c = self.asm.counters
            rejected = c.total_rejected
            new_rej = rejected - self._last_rejected
            self._last_rejected = rejected
            now_can = self.asm.last_ts
            timeouts = self.asm.check_timeouts(now_can + (self.silence() if math.isfinite(self.silence()) else 0.0)) \
                if math.isfinite(now_can) else [r.name for r in self.asm.decoder.routes.values()]
            rates = self.asm.rates()
            stats = {name: (st.count, st.timeouts, st.counter_errors, st.crc_errors) for name, st in self.asm.stats.items()}
            unknown = sorted(self.asm.unknown_ids.items(), key=lambda kv: -kv[1])[:5]
            values = {
                "source": self.source.description,
                "frames_accepted": c.accepted,
                "frames_rejected": rejected,
                **{f"rejected_{k}": v for k, v in c.rejected.items()},
                "unknown_ids": ",".join(f"0x{i:X}:{n}" for i, n in unknown),
                "samples_published": self.samples_published,
                "samples_skipped_gaps": self.sampler.skipped,
                "source_errors": self.source_errors,
                "last_frame_age_s": self.silence(),
            }
        silent = self.silence()
        if self.source_errors and not math.isfinite(self.last_rx_steady) or (
                self.last_error and silent > self.p["stale_after"]):
            level, msg = ERROR, f"CAN source failing: {self.last_error}"
        elif silent > self.p["stale_after"]:
            level, msg = STALE, ("no CAN frame received yet" if not math.isfinite(silent)
                                 else f"CAN bus silent for {silent:.1f} s")
        elif new_rej:
            level, msg = WARN, f"{new_rej} frames rejected in the last period"
        else:
            level, msg = OK, "receiving"
        values["level_reason"] = msg
        with self.diag.batch():
            self._update_statuses(level, msg, values, stats, rates, timeouts, silent)

    def _update_statuses(self, level, msg, values, stats, rates, timeouts, silent) -> None:
        self.diag.update("can_bus", level, msg, values)
        per_msg = {}
        for name, (_count, n_to, n_ctr, n_crc) in stats.items():
            per_msg[f"{name}.rate_hz"] = rates.get(name, 0.0)
            per_msg[f"{name}.timeouts"] = n_to
            per_msg[f"{name}.counter_errors"] = n_ctr
            per_msg[f"{name}.crc_errors"] = n_crc
        if silent > self.p["stale_after"]:
            self.diag.update("can_messages", STALE, "no traffic", per_msg)
        elif timeouts:
            self.diag.update("can_messages", WARN, "timeout: " + ", ".join(timeouts), per_msg)
        else:
            self.diag.update("can_messages", OK, "all messages within timeout", per_msg)

    def destroy_node(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self.source.close()
        if self._raw_log is not None:
            self._raw_log.stop()
        super().destroy_node()


NODE_CLASS = CanBridgeNode


def main(args: list[str] | None = None) -> None:
    spin_node(CanBridgeNode, args)


if __name__ == "__main__":
    main()
