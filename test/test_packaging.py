"""The package installs like an ament_python package: share/ files, ament index marker, entry points."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile

import pytest

pytestmark = pytest.mark.e2e


def test_package_xml_format3_with_rosdep_keys(root):
    """rosdep can install what the package needs on a ROS machine."""
    pkg = ET.parse(root / "package.xml").getroot()
    assert pkg.get("format") == "3" and pkg.findtext("name") == "bms_ai"
    deps = {e.text for e in pkg.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "diagnostic_msgs", "std_msgs", "launch", "launch_ros", "python3-can",
            "python3-numpy", "cantools", "onnxruntime"} <= deps
    assert pkg.find("export/build_type").text == "ament_python"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, root):
    """The package built as a wheel, as pip or colcon would build it."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return next(out.glob("bms_ai-*.whl"))


def test_wheel_installs_share_files_and_entry_points(wheel):
    """An installed package finds its launch file, configs, models and drives, and ros2 run finds its nodes."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
        eps = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "share/ament_index/resource_index/packages/bms_ai" in data
    for needed in ("share/bms_ai/package.xml", "share/bms_ai/launch/bms_ai.launch.py",
                   "share/bms_ai/config/pack96.yaml", "share/bms_ai/config/bms_ai.yaml",
                   "share/bms_ai/dbc/bms_ai_pack96.dbc"):
        assert needed in data, needed
    for script in ("bms-ai", "can_bridge", "estimator", "fault_monitor", "cloud_uploader", "consumer_example"):
        assert f"{script} = " in eps
    assert not any(n.startswith("test/") for n in names)
    # data read from inside the package at run time
    for needed in ("bms_ai/chemistry/data/ocv_nmc.csv", "bms_ai/chemistry/data/ocv_lfp.csv",
                   "bms_ai/sim/data/cycles/udds.csv"):
        assert needed in names, needed
    for needed in ("share/bms_ai/models/manifest.json", "share/bms_ai/models/faults/manifest.json",
                   "share/bms_ai/config/limits_nmc.yaml", "share/bms_ai/data/drives/nmc_udds/can.blf"):
        assert needed in data, needed
