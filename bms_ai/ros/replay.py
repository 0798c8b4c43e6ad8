"""`bms-ai replay LOG --interface I --channel C [--speed X] [--clock]`: a log onto a bus.

With --clock the replayer also publishes /clock from the log time, so nodes
running with use_sim_time follow the recorded drive.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import can

from bms_ai.can.frames import stamp_ok
from bms_ai.can.sources import SourceError, bus_options, open_source
from bms_ai.core.cliargs import nonneg_float, replay_speed


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The replay subcommand's options."""
    p.add_argument("log", help="CAN log (.asc .blf .log .trc .csv .mf4)")
    p.add_argument("--interface", default="virtual", help="python-can interface (socketcan, udp_multicast, ...)")
    p.add_argument("--channel", default="vcan0")
    p.add_argument("--bus-options", default="{}", help="extra python-can Bus kwargs as JSON")
    p.add_argument("--speed", type=replay_speed, default=1.0, help="speed factor; 0 = as fast as possible")
    p.add_argument("--loop", action="store_true", help="repeat the log")
    p.add_argument("--clock", action="store_true", help="publish /clock (rosgraph_msgs/Clock) from log time")
    p.add_argument("--start-delay", type=nonneg_float, default=0.0, help="wait this long (s) before the first frame")


def replay(args: argparse.Namespace, stop: threading.Event | None = None) -> dict:
    """Send the log's frames onto the bus in log time; returns counts, duration and read errors."""
    stop = stop or threading.Event()
    source = open_source(args.log, kind="log", speed=args.speed, loop=args.loop)
    bus = can.Bus(interface=args.interface, channel=args.channel, **bus_options(args.bus_options))
    clock = None
    if args.clock:
        from bms_ai.ros.clock import ClockPublisher  # rclpy only when asked for

        clock = ClockPublisher()
    sent = errors = bad_stamps = 0
    t0 = time.monotonic()
    try:
        if args.start_delay > 0:
            time.sleep(args.start_delay)
        for msg in source.frames(stop):
            if source.finished:
                break
            if msg is None:
                continue
            if not stamp_ok(msg.timestamp):
                bad_stamps += 1  # sent, but never a /clock time or a pause
            elif clock is not None:
                clock.publish(msg.timestamp)
            try:
                bus.send(msg)
                sent += 1
            except can.CanError:
                errors += 1
    finally:
        bus.shutdown()
        if clock is not None:
            clock.close()
    return {"sent": sent, "send_errors": errors, "bad_stamps": bad_stamps, "gaps_shortened": source.gaps_shortened,
            "seconds": time.monotonic() - t0, "read_errors": source.errors}


def run(args: argparse.Namespace) -> int:
    """``bms-ai replay``: exit status 1 on a source error, a damaged log or nothing valid to replay.

    Stamps that cannot be log time (NaN, inf, negative, 1e300) are sent without
    pacing and counted; a pause over MAX_REPLAY_GAP is shortened and counted.
    """
    try:
        stats = replay(args)
    except SourceError as exc:
        print(f"bms-ai replay: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats), file=sys.stderr)
    for err in stats["read_errors"]:
        print(f"bms-ai replay: warning: {err}", file=sys.stderr)
    if stats["sent"] <= stats["bad_stamps"]:
        print(f"bms-ai replay: warning: {args.log}: nothing valid replayed (no frame with a usable stamp)",
              file=sys.stderr)
        return 1
    return 0 if not stats["read_errors"] else 1
