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


MAX_JSON_BYTES = 4 << 20  # manifests and model metadata are KBs; a bigger file is not one of them


def load_json(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parsed JSON document of ``path``, or a one-line ValueError naming the file and ``what`` it should be.

    Bounded like YAML configs: the size is capped and deep nesting (which
    would end in RecursionError inside the json module) is an error too.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise ValueError(f"{p.name}: cannot read {what}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise ValueError(f"{p.name}: {what} larger than {max_bytes} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p.name}: {what} is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p.name}: {what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{p.name}: {what} is nested too deeply") from None
