"""DBC loading with errors that say what is wrong and how to proceed, and repairs public DBCs need.

Public vehicle DBCs are often written for other tools: the Hyundai Kona
powertrain DBC has no ``BU_`` (nodes) line, which cantools' parser rejects in
strict and non-strict mode alike. The tolerant loader (the default) repairs
such omissions in memory, never in the file, and says so in a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import cantools
from cantools.database import Database

log = logging.getLogger("bms_ai.can.dbc")

_STRICT_HINT = (" The file is rejected by cantools' strict mode (typical in vehicle DBCs:"
                " overlapping signals, signals beyond the frame length)."
                " To load it anyway set `dbc_strict: false` in the pack config"
                " (or pass --no-strict); overlapping signals then decode independently.")
#: the sections a DBC lists after its nodes (BU_) line; a missing BU_ line goes before the first of them
_AFTER_BU = re.compile(r"^(VAL_TABLE_|BO_|BO_TX_BU_|EV_|CM_|BA_DEF_|BA_|VAL_|SIG_GROUP_)\b", re.M)
_HAS_BU = re.compile(r"^[ \t]*BU_[ \t]*:", re.M)


class DbcError(ValueError):
    """A DBC file could not be used."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())  # cantools' messages can span lines; the error is one line


def _add_missing_nodes_line(text: str) -> tuple[str, int | None]:
    """``text`` with an empty ``BU_:`` line where a DBC has none, and the line number it went to."""
    if _HAS_BU.search(text):
        return text, None
    m = _AFTER_BU.search(text)
    if m is None:
        return text, None
    line = text.count("\n", 0, m.start()) + 1
    return text[:m.start()] + "BU_:\n\n" + text[m.start():], line


def _parse_error(exc: Exception) -> tuple[int, int, str] | None:
    """(line, column, text) of a cantools syntax error (textparser's ParseError under cantools' error)."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is not None and isinstance(getattr(e, "line", None), int):
            return e.line, int(getattr(e, "column", 0) or 0), _one_line(getattr(e, "text", "") or "")
    return None


def _syntax_message(p: Path, text: str, where: tuple[int, int, str], inserted: int | None) -> str:
    """The one-line error for a DBC cantools cannot parse: file, line, the likely cause."""
    line, col, _ = where
    if inserted is not None and line > inserted:
        line -= 2  # report the line of the user's file, not of the repaired text
    lines = text.splitlines()
    shown = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    if inserted is None and not _HAS_BU.search(text):
        cause = ("the file has no BU_ (nodes) line, which cantools requires; load it tolerantly"
                 " (the default: an empty BU_ line is added in memory) or add `BU_:` after the NS_ block")
    elif shown.startswith(("BO_ ", "SG_ ")):
        cause = "a message or signal line cantools cannot read (a name with spaces or odd characters,"
        cause += " a missing field)"
    else:
        cause = "a line cantools' DBC grammar does not know (a section from another tool, or a typo)"
    return f"cannot parse DBC {p}: line {line}, column {col}: {shown[:80]!r}: likely {cause}"


def load_dbc(path: str | Path, strict: bool = True, tolerant: bool = True,
             warn: Callable[[str], None] | None = None) -> Database:
    """Load a DBC with cantools; one-line errors that name the file, the line and what to do.

    ``tolerant`` repairs in memory what public DBCs omit (a missing ``BU_``
    line), each repair reported through ``warn`` (default: the
    ``bms_ai.can.dbc`` logger). ``strict`` is cantools' check of the signal
    layout; a file that fails only that check gets the switch that loads it.
    """
    p = Path(path)
    if not p.is_file():
        raise DbcError(f"DBC file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DbcError(f"cannot read DBC {p}: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")  # what cantools assumes for a DBC
    fixed, inserted = _add_missing_nodes_line(text) if tolerant else (text, None)
    try:
        db = cantools.database.load_string(fixed, database_format="dbc", strict=strict)
    except Exception as exc:  # cantools raises several unrelated types here
        where = _parse_error(exc)
        if where is not None:
            raise DbcError(_syntax_message(p, text, where, inserted)) from exc
        raise DbcError(f"cannot load DBC {p}: {type(exc).__name__}: {_one_line(exc)}."
                       f"{_STRICT_HINT if strict else ''}") from exc
    if not db.messages:
        raise DbcError(f"DBC {p} defines no messages (BO_ lines); is it a DBC file?")
    if inserted is not None:
        (warn or log.warning)(f"DBC {p} has no BU_ (nodes) line; loaded with an empty one added in memory "
                              f"before line {inserted} (the file is unchanged)")
    return db
