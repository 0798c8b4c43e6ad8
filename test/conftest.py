"""Test-wide settings: DDS stays on this machine, one ROS domain per run, hypothesis effort per tier.

HYPOTHESIS_PROFILE selects how hard property tests search: "dev" (default, a
few examples, for quick feedback) or "ci" (ten times as many; ./dev.sh test).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
# Parallel runs (several checkouts on one machine) must not see each other's nodes.
os.environ.setdefault("ROS_DOMAIN_ID", str(40 + os.getpid() % 60))

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,  # CI is repeatable; the
                          suppress_health_check=[HealthCheck.too_slow])         # long fuzz runs explore
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def root() -> Path:
    """The checkout (config/, data/, launch/ are read from here)."""
    return ROOT


@pytest.fixture(scope="session")
def pack_config_path() -> Path:
    """The reference pack config (96 cells, the shipped DBC)."""
    return ROOT / "config" / "pack96.yaml"


@pytest.fixture(scope="session")
def decoder(pack_config_path):
    """The reference pack's decoder (config/pack96.yaml)."""
    from bms_ai.can.decoder import PackDecoder
    from bms_ai.can.packconfig import load_pack_config

    return PackDecoder(load_pack_config(pack_config_path))


@pytest.fixture(scope="module")
def messages(decoder):
    """One second of the reference pack's traffic (fresh message objects per module)."""
    from testutil import synthetic_messages

    return synthetic_messages(decoder, 100.0, 101.0)


@pytest.fixture(autouse=True)
def _own_ros_home(tmp_path_factory, monkeypatch):
    """Each test gets its own ROS_HOME: stored estimator state never leaks between tests or into ~/.ros."""
    monkeypatch.setenv("ROS_HOME", str(tmp_path_factory.mktemp("ros_home")))


def pytest_collection_modifyitems(config, items):
    """pybamm tests skip when it is absent, without importing it at collection (3 s the fast tier never uses)."""
    from importlib.util import find_spec

    if find_spec("pybamm") is None:
        skip = pytest.mark.skip(reason="pybamm is not installed (./dev.sh installs it from setup.py)")
        for item in items:
            if "pybamm" in item.keywords:
                item.add_marker(skip)
