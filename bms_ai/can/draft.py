"""`bms-ai pack-config draft --dbc DBC [--log LOG]`: a commented pack config, guessed from a DBC, to edit.

A new vehicle starts from its DBC: the draft picks the signals that look like
pack voltage, pack current, SOC, temperatures and cell voltages by name and
unit, lists the runners-up as comments, and (with a log) shows the range each
one took in the log, so the user can tell a pack voltage from a bus voltage
before editing. The result follows the pack config schema
(:mod:`bms_ai.can.packconfig`, docs/pack_config.md); TODO marks what a DBC
cannot say (cell count, chemistry, current sign).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: words that mark a signal as something other than the traction battery's
_NOT_PACK = re.compile(r"12v|lv|aux|tpms|cpu|pcb|hvac|motor|inverter|dcdc|evse|charger|fan|pump|coolant|cabin"
                       r"|ambient|outside|seat|lamp|mirror|target|limit|max|min|request|req", re.I)
_PACK = re.compile(r"batt|pack|hv|bms|akku|accu", re.I)
_CELL = re.compile(r"cell|brick", re.I)


@dataclass
class Candidate:
    """One DBC signal that may carry a pack quantity, with how well its name and unit fit."""

    message: str
    signal: str
    unit: str
    score: int
    lo: float = math.inf  # observed in the log
    hi: float = -math.inf
    n: int = 0

    def observed(self) -> str:
        """The range seen in the log, for a comment."""
        if not self.n:
            return ""
        return f"observed {self.lo:g} .. {self.hi:g} {self.unit} ({self.n} frames)"


@dataclass
class Draft:
    """The guesses for every pack quantity, best first."""

    voltage: list[Candidate] = field(default_factory=list)
    current: list[Candidate] = field(default_factory=list)
    soc: list[Candidate] = field(default_factory=list)
    temps: list[Candidate] = field(default_factory=list)
    cells: list[Candidate] = field(default_factory=list)

    def all(self) -> Iterable[Candidate]:
        """Every candidate (for the log statistics)."""
        for group in (self.voltage, self.current, self.soc, self.temps, self.cells):
            yield from group


def _unit(sig) -> str:
    return (sig.unit or "").strip().replace("°", "").replace("deg", "").lower()


def _span(sig) -> float:
    """The largest magnitude a signal can carry (its DBC maximum, else what its bits allow)."""
    if sig.maximum:
        return abs(float(sig.maximum))
    return abs((2 ** sig.length - 1) * float(sig.scale)) + abs(float(sig.offset))


_STRONG = re.compile(r"batt|pack|akku|accu", re.I)
_ODD = re.compile(r"debug|dbg|log|link|shunt|neg|pos|fc|ptc|cmpd|chain|limiting|change|ocv|start", re.I)


def _context(message: str, name: str) -> int:
    """Points for a battery word in the signal (more) or message name; off for debug or side quantities."""
    points = 3 * bool(_STRONG.search(name)) + bool(re.search(r"hv|bms", name, re.I))
    points += bool(re.search(r"bms|batt|hv", message, re.I))
    return points - 4 * bool(_ODD.search(name) or re.search(r"debug|dbg|log", message, re.I))


def _score_voltage(message: str, name: str, unit: str, sig) -> int:
    if unit != "v" or _CELL.search(name) or _NOT_PACK.search(name) or _span(sig) < 100:
        return 0
    return max(1, 1 + _context(message, name) + bool(re.search(r"volt|^v|v$", name, re.I)))


def _score_current(message: str, name: str, unit: str, sig) -> int:
    if unit != "a" or _CELL.search(name) or _NOT_PACK.search(name) or _span(sig) < 50:
        return 0
    return max(1, 1 + _context(message, name) + bool(re.search(r"curr|amp|^i", name, re.I)))


def _score_soc(message: str, name: str, unit: str, sig) -> int:
    if unit != "%" or not re.search(r"soc|state_?of_?charge", name, re.I):
        return 0
    points = 2 + bool(re.search(r"disp|ui|ave|avg", name, re.I)) + bool(re.search(r"bms|batt", message, re.I))
    return max(1, points - 2 * bool(re.search(r"min|max|change|ocv|start|fraction", name, re.I)))


def _score_temp(message: str, name: str, unit: str, sig) -> int:
    if unit not in ("c", "celsius") or re.search(r"cpu|pcb|hvac|tpms|motor|inverter|coolant|cabin|ambient|"
                                                 r"outside|setpoint|target|model|fet|cable", name, re.I):
        return 0
    if not (_PACK.search(name) or _CELL.search(name) or re.search(r"module|takku", name, re.I)):
        return 0
    return max(1, 1 + _context(message, name) + 2 * bool(_CELL.search(name)) + bool(re.search(r"temp|^t", name, re.I)))


def _score_cell(message: str, name: str, unit: str, sig) -> int:
    if unit not in ("v", "mv") or not _CELL.search(name) or re.search(r"min|max|num|avg|ave", name, re.I):
        return 0
    top = _span(sig) / (1000.0 if unit == "mv" else 1.0)
    return 1 if 0 < top < 10 or sig.maximum in (None, 0) else 0


def guess(db) -> Draft:
    """Candidates for each pack quantity from the DBC's signal names and units, best first."""
    d = Draft()
    roles = ((d.voltage, _score_voltage), (d.current, _score_current), (d.soc, _score_soc),
             (d.temps, _score_temp), (d.cells, _score_cell))
    for m in db.messages:
        for s in m.signals:
            unit = _unit(s)
            for out, score in roles:
                if (k := score(m.name, s.name, unit, s)) > 0:
                    out.append(Candidate(m.name, s.name, s.unit or "", k))
    for out, _ in roles:
        out.sort(key=lambda c: -c.score)  # stable: DBC order among equals
    return d


def observe(d: Draft, db, log: str | Path, channel: str | None = None) -> list[str]:
    """Fill in the range each candidate took in ``log`` (streamed); the log's damage, if any."""
    from bms_ai.can.decode_cli import RawDecoder
    from bms_ai.can.logs import iter_log

    wanted = {(c.message, c.signal): c for c in d.all()}
    dec = RawDecoder(db)
    names = {m for m, _ in wanted}
    dec.by_id = {k: v for k, v in dec.by_id.items() if v[0].name in names}
    errors: list[str] = []
    read = matched = 0
    for msg in iter_log(log, errors, channel=channel):
        read += 1
        got = dec.decode(msg)
        if got is None:
            continue
        matched += 1
        m, values = got
        for name, v in values.items():
            c = wanted.get((m.name, name))
            if c is not None and isinstance(v, (int, float)) and math.isfinite(v):
                c.lo, c.hi, c.n = min(c.lo, v), max(c.hi, v), c.n + 1
    if not matched:  # a draft annotated from nothing would still say "ranges seen in" the log
        on_bus = f" on bus {channel}" if channel is not None else ""
        why = f"none of its {read} frames{on_bus} is a candidate message of the DBC" if read else \
            f"no frame{on_bus} in the log" + (f" ({errors[-1]})" if errors else "")
        raise ValueError(f"{log}: {why}")
    return errors


def _note(c: Candidate) -> str:
    return f"  # {c.observed()}" if c.n else ""


def _alternatives(cands: list[Candidate], shown: int = 4) -> list[str]:
    return [f"#   or {{message: {c.message}, signal: {c.signal}}}{_note(c)}" for c in cands[1:1 + shown]]


def _scalar(key: str, cands: list[Candidate], extra: str = "") -> list[str]:
    if not cands:
        return [f"{key}: {{message: TODO, signal: TODO}}  # TODO: no signal of the DBC looks like it"]
    c = cands[0]
    return [f"{key}: {{message: {c.message}, signal: {c.signal}{extra}}}{_note(c)}", *_alternatives(cands)]


def _index_of(name: str) -> int | None:
    m = re.search(r"(\d+)\D*$", name)
    return int(m.group(1)) if m else None


def _cells(cands: list[Candidate]) -> tuple[int, list[str]]:
    """The message with the most cell-voltage signals, as explicit ``signals: {name: index}``."""
    if not cands:
        return 0, ["cell_voltages: {message: TODO, signals: {TODO: 0}}  # TODO: no per-cell voltages in this DBC",
                   "# (on some vehicles they come from diagnostic requests, not from the bus)"]
    by_msg: dict[str, list[Candidate]] = {}
    for c in cands:
        by_msg.setdefault(c.message, []).append(c)
    best = max(by_msg.values(), key=len)
    idx = [_index_of(c.signal) for c in best]
    if None in idx or len(set(idx)) != len(idx):
        idx = list(range(len(best)))
    best, idx = zip(*sorted(zip(best, idx), key=lambda p: p[1]))
    base = min(idx)
    scale = ", scale: 0.001" if best[0].unit.strip().lower() == "mv" else ""
    lines = [f"cell_voltages:  # {len(best)} signals of {best[0].message}: check the count against the pack",
             f"  message: {best[0].message}", "  signals:"]
    lines += [f"    {c.signal}: {i - base}{_note(c)}" for c, i in zip(best, idx)]
    if scale:
        lines.append(f"  {scale.strip(', ')}  # the DBC gives mV")
    return len(best), lines


def _temps(cands: list[Candidate]) -> tuple[int, list[str]]:
    if not cands:
        return 0, ["# cell_temperatures: no temperature signal of the pack found in the DBC"]
    msg = cands[0].message
    chosen = [c for c in cands if c.message == msg]
    lines = [f"cell_temperatures:  # {len(chosen)} signals of {msg}", f"  message: {msg}", "  signals:"]
    lines += [f"    {c.signal}: {i}{_note(c)}" for i, c in enumerate(chosen)]
    others = [c for c in cands if c.message != msg]
    lines += [f"#   or {c.message}.{c.signal}{_note(c)}" for c in others[:4]]
    return len(chosen), lines


def render(d: Draft, dbc: Path, strict: bool, log: str | None = None) -> str:
    """The draft as YAML text with comments."""
    n_cells, cell_lines = _cells(d.cells)
    n_temps, temp_lines = _temps(d.temps)
    lines = [
        f"# Draft pack config for {dbc.name}, guessed from signal names and units"
        + (f" and the ranges seen in {Path(log).name}" if log else "") + ".",
        "# Check every line marked TODO and every guess before use (docs/pack_config.md).",
        "pack_id: TODO-vehicle",
        f"dbc: {dbc}",
        f"dbc_strict: {str(strict).lower()}" + ("" if strict else "  # cantools' strict layout check rejects it"),
        "chemistry: nmc  # TODO: nmc | lfp | nca | lto",
        f"cells: {n_cells or 'TODO'}" + ("  # TODO: cells in series" if not n_cells else ""),
        f"temperature_sensors: {n_temps}",
        *_scalar("pack_voltage", d.voltage),
        *_scalar("pack_current", d.current),
        "# TODO: the sign: add `scale: -1` to pack_current if the DBC counts discharge positive",
        *cell_lines,
        *temp_lines,
    ]
    if d.soc:
        lines += ["status:", *("  " + x for x in _scalar("soc_reported", d.soc))]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The pack-config subcommand's options."""
    p.add_argument("action", choices=("draft",), help="draft: a commented pack config from a DBC")
    p.add_argument("--dbc", required=True, help="the vehicle's DBC")
    p.add_argument("--log", help="a CAN log of the vehicle: the range each guessed signal took")
    p.add_argument("--bus", help="only frames of this bus of the log (e.g. 0 in a SavvyCAN log)")
    p.add_argument("-o", "--output", help="output file (default: stdout)")


def run(args: argparse.Namespace) -> int:
    """``bms-ai pack-config draft``: the draft on stdout (or a file), notes on stderr."""
    from bms_ai.can.dbc import DbcError, load_dbc

    def warn(m: str) -> None:
        print(f"warning: {m}", file=sys.stderr)

    strict = True
    try:
        db = load_dbc(args.dbc, strict=True, warn=warn)
    except DbcError as exc:
        if "strict mode" not in str(exc):
            raise
        db, strict = load_dbc(args.dbc, strict=False, warn=warn), False
    d = guess(db)
    if args.log:
        for err in observe(d, db, args.log, args.bus):
            warn(err)
    text = render(d, Path(args.dbc).resolve(), strict, args.log)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    found = {k: len(v) for k, v in vars(d).items()}
    print(f"draft from {len(db.messages)} messages; candidates {found}; edit the TODO lines", file=sys.stderr)
    return 0
