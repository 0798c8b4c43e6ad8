"""Reading a YAML config file with errors that name the file and what is wrong.

Config files come from users and from vehicles' software bundles, so reading
one is bounded: the file size, the number of aliases (a "billion laughs"
document of 2 KB otherwise expands to gigabytes wherever it is printed or
walked) and the nesting depth (the composer recurses, so deep nesting would
end in RecursionError) all have limits, and every breach is a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bms_ai.core.files import read_bounded

MAX_BYTES = 1 << 20   # configs are a few KB; 1 MiB leaves room for long comment blocks
MAX_ALIASES = 16      # anchors are fine for sharing a block a few times, never for expansion
MAX_DEPTH = 32        # the deepest shipped config nests 4 levels


class YamlLimitError(yaml.YAMLError):
    """A document exceeds one of the reading limits (aliases, depth)."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and nesting while composing (before any object is built)."""

    max_aliases = MAX_ALIASES
    max_depth = MAX_DEPTH

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Refuse a document with too many aliases or too deep a nesting, naming the line."""
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > self.max_aliases:
                mark = self.peek_event().start_mark
                raise YamlLimitError(f"more than {self.max_aliases} aliases (line {mark.line + 1}); "
                                     "write the values out instead of referencing anchors")
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                mark = self.peek_event().start_mark
                raise YamlLimitError(f"nested deeper than {self.max_depth} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str, max_aliases: int = MAX_ALIASES, max_depth: int = MAX_DEPTH) -> Any:
    """The document in ``text`` under the alias and depth limits; raises yaml.YAMLError."""
    loader = _BoundedLoader(text)
    loader.max_aliases, loader.max_depth = max_aliases, max_depth
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message (context, marks, snippet) squeezed to one line."""
    if isinstance(exc, YamlLimitError):
        return str(exc)
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def load_yaml(path: str | Path, what: str, error: type[Exception] = ValueError,
              missing: type[Exception] = FileNotFoundError, max_bytes: int = MAX_BYTES) -> Any:
    """Parsed document of ``path``; ``what`` names the file's role in error messages."""
    p = Path(path)
    if not p.is_file():
        raise missing(f"{what} not found: {p}")
    raw = read_bounded(p, what, max_bytes, error, str(p), "; is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{p}: {what} is not UTF-8 text (byte {exc.start})") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML: {_one_line(exc)}") from None
    except (ValueError, OverflowError) as exc:  # a scalar its type cannot hold (date 2024-13-01, 5000-digit int)
        raise error(f"{p}: not valid YAML: {exc}") from None
    except RecursionError:  # a limit above the interpreter's stack (never with the defaults)
        raise error(f"{p}: not valid YAML: nested too deeply") from None
