"""File helpers shared by the model manifest, training and the uplink spool."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks so large files need little memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def read_bounded(path: Path, what: str, max_bytes: int, error: type[Exception], label: str, hint: str = "") -> bytes:
    """The bytes of a config-like file, at most ``max_bytes`` (a bigger file is refused, never read whole).

    ``label`` names the file in the one-line ``error``; ``hint`` follows the size message.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{label}: cannot read {what}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise error(f"{label}: {what} larger than {max_bytes} bytes{hint}")
    return raw


MAX_JSON_BYTES = 4 << 20  # manifests and model metadata are KBs; a bigger file is not one of them


def load_json(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parsed JSON document of ``path``, or a one-line ValueError naming the file and ``what`` it should be.

    Bounded like YAML configs: the size is capped and deep nesting (which
    would end in RecursionError inside the json module) is an error too.
    """
    p = Path(path)
    raw = read_bounded(p, what, max_bytes, ValueError, p.name)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p.name}: {what} is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p.name}: {what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{p.name}: {what} is nested too deeply") from None
