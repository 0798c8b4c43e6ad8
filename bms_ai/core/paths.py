"""Where the package's shared files (config, dbc, models, drives) live.

Installed by colcon: <prefix>/share/bms_ai; pip: <sys.prefix>/share/bms_ai;
a source checkout: the repository root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "bms_ai"
REPO_ROOT = Path(__file__).resolve().parents[2]


def share_dir() -> Path:
    """The folder holding config/, dbc/, models/ and data/: checkout first, then ament prefixes, then pip's."""
    if (REPO_ROOT / "package.xml").is_file() and (REPO_ROOT / "config").is_dir():
        return REPO_ROOT
    prefixes = os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) + [sys.prefix]
    for prefix in prefixes:
        p = Path(prefix) / "share" / PACKAGE
        if (p / "config").is_dir():
            return p
    return REPO_ROOT


def share_path(*parts: str) -> Path:
    """A shipped file, wherever the package was installed from."""
    return share_dir().joinpath(*parts)


def default_pack_config() -> Path:
    """The reference pack (96s, config/pack96.yaml) every tool falls back to."""
    return share_path("config", "pack96.yaml")
