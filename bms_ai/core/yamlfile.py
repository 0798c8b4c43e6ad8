"""Reading a YAML config file with errors that name the file and what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_yaml(path: str | Path, what: str, error: type[Exception] = ValueError,
              missing: type[Exception] = FileNotFoundError) -> Any:
    """Parsed document of ``path``; ``what`` names the file's role in error messages."""
    p = Path(path)
    if not p.is_file():
        raise missing(f"{what} not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML: {exc}") from exc
