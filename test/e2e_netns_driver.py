"""Runs inside a private network namespace (`unshare -n`): replayer -> udp_multicast -> graph -> consumer.

Three separate processes, as on a vehicle: `bms-ai replay` puts the drive on a
udp_multicast CAN bus, `bms-ai run` is the graph, the consumer example is
plain rclpy. Writes what the consumer printed to OUT/consumer.jsonl.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

GROUP = "239.74.163.2"


def main() -> int:
    """Start graph and consumer, replay the log onto the bus, stop everything; the replay's exit code."""
    out, log, seconds, speed = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    nodes = sys.argv[5] if len(sys.argv) > 5 else "can_bridge,estimator,fault_monitor"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "route", "add", "224.0.0.0/4", "dev", "lo"], check=True)
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1")
    py = sys.executable
    with contextlib.ExitStack() as files:
        graph_log = files.enter_context(open(out / "graph.log", "w"))
        cons_out = files.enter_context(open(out / "consumer.jsonl", "w"))
        cons_err = files.enter_context(open(out / "consumer.err", "w"))
        graph = subprocess.Popen(
            [py, "-m", "bms_ai.cli", "run", "--interface", "udp_multicast", "--channel", GROUP, "--nodes", nodes],
            env=env, stdout=graph_log, stderr=subprocess.STDOUT)
        consumer = subprocess.Popen(
            [py, "-m", "bms_ai.nodes.consumer_example", "--ros-args", "-r", "__ns:=/bms", "-p", "json_output:=true"],
            env=env, stdout=cons_out, stderr=cons_err)
        try:
            time.sleep(4.0)  # graph and consumer up, DDS discovery done
            r = subprocess.run([py, "-m", "bms_ai.cli", "replay", log, "--interface", "udp_multicast",
                                "--channel", GROUP, "--speed", str(speed)],
                               env=env, capture_output=True, text=True, timeout=seconds / speed + 60)
            (out / "replay.log").write_text(r.stdout + r.stderr)
            time.sleep(2.5)  # the last estimates and the STALE diagnostics reach the consumer
            return r.returncode
        finally:
            for p in (consumer, graph):
                p.terminate()
            for p in (consumer, graph):
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    sys.exit(main())
