"""DBC loading with errors that say what is wrong and how to proceed."""

from __future__ import annotations

from pathlib import Path

import cantools
from cantools.database import Database


class DbcError(ValueError):
    """A DBC file could not be used."""


def load_dbc(path: str | Path, strict: bool = True) -> Database:
    """Load a DBC with cantools.

    Real vehicle DBCs often fail cantools' strict checks (overlapping signals,
    signals past the frame end, no ``BU_`` section). The error names the
    problem and the switch that loads the file anyway, instead of a bare
    cantools traceback.
    """
    p = Path(path)
    if not p.is_file():
        raise DbcError(f"DBC file not found: {p}")
    try:
        db = cantools.database.load_file(str(p), database_format="dbc", strict=strict)
    except Exception as exc:  # cantools raises several unrelated types here
        hint = ""
        if strict:
            hint = (
                " The file is rejected by cantools' strict mode (typical in vehicle DBCs:"
                " overlapping signals, signals beyond the frame length, a missing BU_ section)."
                " To load it anyway set `dbc_strict: false` in the pack config"
                " (or pass --no-strict); overlapping signals then decode independently."
            )
        why = " ".join(str(exc).split())  # cantools' messages can span lines; the error is one line
        raise DbcError(f"cannot load DBC {p}: {type(exc).__name__}: {why}.{hint}") from exc
    if not db.messages:
        raise DbcError(f"DBC {p} defines no messages (BO_ lines); is it a DBC file?")
    return db
