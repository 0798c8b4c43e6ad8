"""Estimator state that survives power cycles: atomic, versioned, checksummed files.

The vehicle computer can lose power at any instant. The state is written to a
temporary file, fsynced and renamed over the old one, so a reader sees either
the old or the new state, never half of one. A checksum over the payload
catches bit rot; a file that fails any check is reported and ignored (the
estimator then starts from the voltage), never a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FORMAT = "bms_ai.estimator_state"
VERSION = 1
MAX_BYTES = 4 << 20


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode_state(payload: dict) -> bytes:
    """The file content for ``payload`` (JSON with format, version and checksum)."""
    doc = {"format": FORMAT, "version": VERSION, "sha256": _digest(payload), "payload": payload}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def decode_state(blob: bytes) -> tuple[dict | None, str]:
    """(payload, '') or (None, why it was refused)."""
    if len(blob) > MAX_BYTES:
        return None, f"estimator state too large ({len(blob)} bytes)"
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"estimator state is not valid JSON ({exc})"
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None, "not an estimator state file"
    if doc.get("version") != VERSION:
        return None, f"estimator state version {doc.get('version')!r}, expected {VERSION}"
    payload = doc.get("payload")
    if not isinstance(payload, dict) or doc.get("sha256") != _digest(payload):
        return None, "estimator state checksum mismatch (corrupt file)"
    return payload, ""


def write_state(path: str | Path, payload: dict) -> None:
    """Atomically replace ``path`` with ``payload``; OSError propagates (the caller reports it)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    data = encode_state(payload)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_state(path: str | Path) -> tuple[dict | None, str]:
    """(payload, '') or (None, why not): a missing file is not an error but says so."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_BYTES:
            return None, f"{p}: estimator state too large"
        blob = p.read_bytes()
    except FileNotFoundError:
        return None, f"no stored estimator state at {p}"
    except OSError as exc:
        return None, f"{p}: cannot read estimator state ({exc.strerror or exc})"
    payload, why = decode_state(blob)
    return payload, (f"{p}: {why}" if why else "")


def resolve_state_path(setting: str, namespace: str = "/") -> Path | None:
    """'' -> None (off); 'auto' -> $ROS_HOME/bms_ai/<namespace>_estimator.json (ROS_HOME default ~/.ros)."""
    if not setting:
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    ros_home = Path(os.environ.get("ROS_HOME") or Path.home() / ".ros")
    name = namespace.strip("/").replace("/", "_") or "root"
    return ros_home / "bms_ai" / f"{name}_estimator.json"
