"""Node executables as `ros2 launch` starts them (one process each): a configuration they cannot run with
ends in one line naming the problem and exit code 1, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ros

CASES = [
    ("estimator", ["-p", "capacity_ah:=abc"], "parameter capacity_ah expects double"),
    ("estimator", ["-p", "chemistry:=nca_typo"], "unknown chemistry 'nca_typo'"),
    ("can_bridge", ["-p", "interface:=socketcn"], "unknown CAN interface 'socketcn'"),
    ("can_bridge", ["-p", "can_log:=/nonexistent/drive.blf"], "CAN log not found"),
    ("fault_monitor", ["-p", "pack_config:=/nonexistent/pack.yaml"], "/nonexistent/pack.yaml"),
    ("cloud_uploader", ["-p", "spool_dir:=/proc/no_spool_here"], "/proc/no_spool_here"),
    ("estimator", ["--params-file", "/nonexistent/params.yaml"], "Couldn't parse params file"),
    ("fault_monitor", ["-p", "rate_hz:={unclosed"], "Couldn't parse parameter override rule"),
]


@pytest.mark.parametrize("node,params,reason", CASES, ids=[f"{c[0]}-{c[1][1].split(':=')[0]}" for c in CASES])
def test_a_node_started_with_a_bad_configuration_says_why_in_one_line(tmp_path, node, params, reason):
    env = dict(os.environ, ROS_HOME=str(tmp_path), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    r = subprocess.run([sys.executable, "-m", f"bms_ai.nodes.{node}", "--ros-args", *params],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1, (r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{node}: error: ") and reason in last and ", at /" not in last, last
