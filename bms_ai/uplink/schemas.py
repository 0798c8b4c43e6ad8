"""ros2msg schema text for MCAP, built exactly like rosbag2's message definition cache.

ROS 2 bag tools (rosbag2_storage_mcap, Foxglove, mcap-ros2-support) expect the
top-level .msg text followed by every dependency, each preceded by 80 ``=`` and
``MSG: pkg/msg/Name``. We read the installed .msg files rather than ship copies,
so the text always matches the message packages the node serialises with.
"""

from __future__ import annotations

import os
import re
import sys
from functools import lru_cache
from pathlib import Path

DELIMITER = "=" * 80

PRIMITIVES = frozenset({
    "bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16",
    "int32", "uint32", "int64", "uint64", "string", "wstring",
})
# Same pattern rosbag2 uses: a field type at line start (bounded strings/arrays allowed).
_FIELD_TYPE = re.compile(r"(?:^|\n)\s*([a-zA-Z0-9_/]+)(?:<=\d+)?(?:\[(?:<=)?\d*\])?\s+")


class SchemaNotFoundError(LookupError):
    """The .msg file for a type is not installed where ament or the venv puts it."""


@lru_cache(maxsize=1024)
def normalise_type(type_name: str) -> str:
    """'sensor_msgs/BatteryState' or 'sensor_msgs/msg/BatteryState' -> 'sensor_msgs/msg/BatteryState'."""
    parts = type_name.strip().split("/")
    if len(parts) == 2:
        return f"{parts[0]}/msg/{parts[1]}"
    if len(parts) == 3 and parts[1] == "msg":
        return type_name.strip()
    raise ValueError(f"not a ROS 2 message type name: {type_name!r}")


def _share_dirs(package: str) -> list[Path]:
    dirs: list[Path] = []
    try:  # ament index works when a ROS environment is sourced
        from ament_index_python.packages import get_package_share_directory
        dirs.append(Path(get_package_share_directory(package)))
    except Exception:  # noqa: BLE001 - index missing or package unknown: fall through to the venv layout
        pass
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            dirs.append(Path(prefix) / "share" / package)
    dirs.append(Path(sys.prefix) / "share" / package)  # ros-jazzy wheels install share/ under the venv
    try:
        import importlib.util
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            p = Path(spec.origin).resolve()
            for parent in p.parents:
                dirs.append(parent / "share" / package)
    except (ImportError, ValueError):
        pass
    return dirs


@lru_cache(maxsize=256)
def msg_file(type_name: str) -> Path:
    """The installed .msg file of a type."""
    pkg, _, name = normalise_type(type_name).split("/")
    for d in _share_dirs(pkg):
        f = d / "msg" / f"{name}.msg"
        if f.is_file():
            return f
    raise SchemaNotFoundError(f"{pkg}/msg/{name}.msg not found (looked in ament index, AMENT_PREFIX_PATH, {sys.prefix}/share)")


def dependencies(text: str, package: str) -> list[str]:
    """Message types a .msg text refers to (Header and package-relative names resolved)."""
    deps: set[str] = set()
    for m in _FIELD_TYPE.finditer(text):
        t = m.group(1)
        if t in PRIMITIVES:
            continue
        if t == "Header":
            deps.add("std_msgs/msg/Header")
        elif "/" not in t:
            deps.add(f"{package}/msg/{t}")
        else:
            deps.add(normalise_type(t))
    return sorted(deps)


@lru_cache(maxsize=256)
def full_definition(type_name: str) -> str:
    """Complete ros2msg definition: the type's .msg, then each dependency once (depth first, sorted)."""
    root = normalise_type(type_name)
    seen: set[str] = set()

    def rec(t: str) -> str:
        text = msg_file(t).read_text(encoding="utf-8")
        out = text
        for dep in dependencies(_strip_comments(text), t.split("/")[0]):
            if dep not in seen:
                seen.add(dep)
                out += f"\n{DELIMITER}\nMSG: {dep}\n" + rec(dep)
        return out

    return rec(root)


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())
