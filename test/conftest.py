"""Test-wide settings: DDS stays on this machine; each test gets its own ROS domain."""

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


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def pack_config_path() -> Path:
    return ROOT / "config" / "pack96.yaml"
