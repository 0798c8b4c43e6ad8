"""The package installs like an ament_python package: rosdep keys, share/ files, ament index marker, entry points."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
import yaml

ROSDEP_RULES = Path("/work/shared/rosdep")
# Keys of ROS packages: rosdep resolves them through the distribution index, not the rules files.
ROS_PACKAGES = {"rclpy", "sensor_msgs", "diagnostic_msgs", "std_msgs", "rosgraph_msgs", "rcl_interfaces",
                "builtin_interfaces", "launch", "launch_ros"}
# Platforms rosdep must resolve on for Jazzy: Ubuntu 24.04 (tier 1) and Debian 12.
PLATFORMS = (("ubuntu", "noble"), ("debian", "bookworm"))
# setup.py requirement -> the module name its python3-* key uses, where the two differ
PYPI_ALIASES = {"pyyaml": "yaml", "python-can": "can"}


def _deps(root: Path) -> dict[str, str]:
    pkg = ET.parse(root / "package.xml").getroot()
    return {e.text.strip(): e.tag for e in pkg if e.tag.endswith("depend") and e.text}


def resolve(rule: object, os_name: str, codename: str) -> list[str] | None:
    """Packages (system or pip) a rosdep rule installs on one platform; None when it has none there."""
    r = rule.get(os_name) if isinstance(rule, dict) else None
    if isinstance(r, dict) and "pip" not in r:
        r = r.get(codename, r.get("*"))
    if isinstance(r, dict) and "pip" in r:
        r = (r["pip"] or {}).get("packages")
    return list(r) if isinstance(r, list) and r else None


@pytest.fixture(scope="module")
def rosdep_rules() -> dict:
    """The rosdistro rules (base.yaml + python.yaml) as rosdep reads them."""
    if not (ROSDEP_RULES / "base.yaml").is_file() or not (ROSDEP_RULES / "python.yaml").is_file():
        pytest.skip(f"rosdep rules not available in {ROSDEP_RULES}")
    rules: dict = {}
    for name in ("base.yaml", "python.yaml"):
        rules.update(yaml.load((ROSDEP_RULES / name).read_text(), Loader=yaml.CSafeLoader))
    return rules


def test_package_xml_format3_with_rosdep_keys(root):
    """rosdep can install what the package needs on a ROS machine."""
    pkg = ET.parse(root / "package.xml").getroot()
    assert pkg.get("format") == "3" and pkg.findtext("name") == "bms_ai"
    deps = set(_deps(root))
    assert {"rclpy", "sensor_msgs", "diagnostic_msgs", "std_msgs", "launch", "launch_ros", "python3-can",
            "python3-numpy", "python3-cantools-pip", "python3-onnxruntime-pip"} <= deps
    assert pkg.find("export/build_type").text == "ament_python"


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_every_rosdep_key_resolves(root, rosdep_rules):
    """`rosdep install --from-paths src --ignore-src` finds a rule for every non-ROS key on Jazzy's platforms."""
    unresolved = [f"{key} ({os_name} {codename})" for key in _deps(root) if key not in ROS_PACKAGES
                  for os_name, codename in PLATFORMS if resolve(rosdep_rules.get(key), os_name, codename) is None]
    assert not unresolved, f"no rosdep rule: {unresolved}"


def test_every_runtime_requirement_has_a_key_or_a_documented_pip_step(root, rosdep_rules):
    """Each install_requires entry is installed by a package.xml key, or the README names its pip step."""
    setup = (root / "setup.py").read_text()
    block = setup[setup.index("install_requires=["):]
    block = block[:block.index("]")]
    reqs = [re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in re.findall(r'"([^"]+)"', block)]
    installed: set[str] = set()
    for key in _deps(root):
        installed.add(key.lower())
        installed.update(p.lower() for p in resolve(rosdep_rules.get(key), "ubuntu", "noble") or [])
    pip_lines = [ln for ln in (root / "README.md").read_text().splitlines() if ln.startswith("pip install")]
    missing = []
    for req in reqs:
        module = PYPI_ALIASES.get(req.lower(), req.lower())
        if not ({req.lower(), f"python3-{module}"} & installed or any(f'"{req}' in ln for ln in pip_lines)):
            missing.append(req)
    assert reqs and not missing, f"neither a rosdep key nor a README pip step: {missing}"


def test_resolve_reads_the_rule_shapes_rosdep_uses():
    """Plain lists, per-codename maps with '*', pip rules, and null (not available) on a codename."""
    assert resolve({"ubuntu": ["python3-a"]}, "ubuntu", "noble") == ["python3-a"]
    assert resolve({"ubuntu": {"*": ["a"], "focal": None}}, "ubuntu", "noble") == ["a"]
    assert resolve({"ubuntu": {"*": ["a"], "noble": None}}, "ubuntu", "noble") is None
    assert resolve({"ubuntu": {"pip": {"packages": ["cantools"]}}}, "ubuntu", "noble") == ["cantools"]
    assert resolve({"ubuntu": {"noble": {"pip": {"packages": ["x"]}}}}, "ubuntu", "noble") == ["x"]
    assert resolve({"fedora": ["a"]}, "ubuntu", "noble") is None and resolve(None, "ubuntu", "noble") is None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, root):
    """The package built as a wheel, as pip or colcon would build it."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return next(out.glob("bms_ai-*.whl"))


@pytest.mark.e2e
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
