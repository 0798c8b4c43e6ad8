"""`bms-ai decode LOG`: pack samples through a pack config, or every DBC signal with ``--raw``.

``bms-ai decode LOG --pack-config YAML [--dbc DBC]`` writes the samples the
live graph would see; ``bms-ai decode LOG --dbc DBC --raw [--signals GLOB]``
writes every signal of every frame (like ``python -m cantools decode``), no
pack config needed: the first look at a vehicle's log. Both stream: memory
does not grow with the log.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from fnmatch import fnmatchcase

from bms_ai.can.assembler import REJECT_REASONS
from bms_ai.can.frames import FrameArrays, stamp_ok, stamps_ok
from bms_ai.can.logs import Timeline, iter_log, read_log_chunks
from bms_ai.core.cliargs import positive_float
from bms_ai.core.paths import default_pack_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The decode subcommand's options."""
    p.add_argument("log", help="CAN log (.asc .blf .log .trc .csv (python-can or SavvyCAN GVRET) .mf4)")
    p.add_argument("--dbc", help="DBC file (with a pack config: instead of the config's; required for --raw)")
    p.add_argument("--pack-config", help="pack config YAML (default without --dbc: the reference pack)")
    p.add_argument("--raw", action="store_true", help="every DBC signal of every frame; no pack config needed")
    p.add_argument("--signals", metavar="GLOB", help="--raw: only signals matching (name or Message.Signal)")
    p.add_argument("--bus", help="only frames of this bus/channel (e.g. 0 in a SavvyCAN log, can0 in candump)")
    p.add_argument("--no-strict", action="store_true", help="load a DBC that cantools rejects in strict mode")
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    p.add_argument("--rate", type=positive_float, default=10.0, help="samples per second of CAN time")
    p.add_argument("--max-age", type=positive_float, default=1.0, help="values older than this (s) are written as NaN")
    p.add_argument("-o", "--output", help="output file (default: stdout)")


def _num(v: float) -> float | None:
    return None if not math.isfinite(v) else round(float(v), 6)


def write_table(t, fmt: str, out, header: bool = True) -> None:
    """One line per sample: CSV with a header (unless a later chunk), or JSON lines (NaN -> null)."""
    n_c, n_t = t.cell_voltages.shape[1], t.cell_temperatures.shape[1]
    status = sorted(t.status)
    if fmt == "csv":
        w = csv.writer(out)
        if header:
            w.writerow(["t", "pack_voltage", "pack_current", *[f"cell_v_{i:03d}" for i in range(n_c)],
                        *[f"cell_t_{i:02d}" for i in range(n_t)], *status])
        for i in range(len(t)):
            w.writerow([f"{t.t[i]:.6f}", *(f"{x:.6g}" for x in (t.pack_voltage[i], t.pack_current[i])),
                        *(f"{x:.6g}" for x in t.cell_voltages[i]), *(f"{x:.6g}" for x in t.cell_temperatures[i]),
                        *(f"{t.status[k][i]:.6g}" for k in status)])
    else:
        for i in range(len(t)):
            out.write(json.dumps({
                "t": round(float(t.t[i]), 6), "pack_voltage": _num(t.pack_voltage[i]),
                "pack_current": _num(t.pack_current[i]),
                "cell_voltages": [_num(x) for x in t.cell_voltages[i]],
                "cell_temperatures": [_num(x) for x in t.cell_temperatures[i]],
                "status": {k: _num(t.status[k][i]) for k in status},
            }) + "\n")


def _output(args: argparse.Namespace):
    return open(args.output, "w", newline="") if args.output else nullcontext(sys.stdout)


def _nothing(log: str, why: str) -> int:
    print(f"bms-ai decode: error: {log}: nothing decoded ({why})", file=sys.stderr)
    return 1


def _report_damage(errors: list[str], n_frames: int) -> None:
    """A log that stopped early is a warning: what was read before it is decoded."""
    for err in errors:
        print(f"warning: {err}; {n_frames} frames read before it are decoded", file=sys.stderr)


class _Span:
    """Frames read and the CAN time they cover (for the summary and the 'too short' reason)."""

    def __init__(self) -> None:
        self.n = 0
        self.first = self.last = math.nan

    def chunks(self, chunks: Iterator[FrameArrays]) -> Iterator[FrameArrays]:
        """Pass chunks through, counting them."""
        for frames in chunks:
            self.n += len(frames)
            good = frames.ts[stamps_ok(frames.ts)]
            if good.size:
                self.first = good.min() if math.isnan(self.first) else min(self.first, good.min())
                self.last = good.max() if math.isnan(self.last) else max(self.last, good.max())
            yield frames

    @property
    def seconds(self) -> float:
        """CAN time from the first to the last usable stamp."""
        return 0.0 if math.isnan(self.first) else float(self.last - self.first)


def run(args: argparse.Namespace) -> int:
    """``bms-ai decode``: output to a file or stdout, a one-line summary on stderr.

    Exit status 0: something decoded (a damaged or truncated log is a
    ``warning:`` line with the frames read before the damage); 1: bad input or
    nothing decoded (one ``error:`` line with the reason).
    """
    try:
        if args.raw:
            return run_raw(args)
        return _checked_pack(args)
    except BrokenPipeError:  # `bms-ai decode ... | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _checked_pack(args: argparse.Namespace) -> int:
    if args.signals:
        raise ValueError("--signals selects DBC signals for --raw; a pack config decodes its own signals")
    if args.pack_config is None and args.dbc:
        raise ValueError(f"--dbc {args.dbc} without --pack-config: pass --pack-config YAML (draft one with "
                         f"`bms-ai pack-config draft --dbc {args.dbc}`) or --raw to decode every DBC signal")
    return run_pack(args)


def run_pack(args: argparse.Namespace) -> int:
    """Pack samples through a pack config (the reference pack's when none is given)."""
    from dataclasses import replace

    from bms_ai.can.decoder import PackDecoder
    from bms_ai.can.offline import decode_chunks
    from bms_ai.can.packconfig import load_pack_config

    cfg = load_pack_config(args.pack_config or default_pack_config(), dbc=args.dbc)
    if args.no_strict:
        cfg = replace(cfg, dbc_strict=False)
    dec = PackDecoder(cfg)
    errors: list[str] = []
    span, timeline = _Span(), Timeline()
    counts: Counter[str] = Counter()
    rejected: Counter[str] = Counter(dict.fromkeys(REJECT_REASONS, 0))
    # streamed chunk by chunk: memory flat in the log's length
    chunks = span.chunks(read_log_chunks(args.log, errors=errors, timeline=timeline, channel=args.bus))
    with _output(args) as out:
        for table in decode_chunks(chunks, dec, 1.0 / args.rate, args.max_age):
            write_table(table, args.format, out, header=not counts["chunks"])
            counts.update(chunks=1, samples=len(table), accepted=table.accepted, skipped=table.skipped)
            rejected.update(table.rejected)
        if not counts["chunks"]:  # not one frame: still the CSV header
            write_table(next(decode_chunks([FrameArrays.empty()], dec, 1.0)), args.format, out)
    foreign = rejected.pop("unknown_id", 0)   # other ECUs' frames on a shared bus: counted, not rejected
    rej = {k: v for k, v in rejected.items() if v}
    extra = [f"{foreign} foreign frames (ids the pack config does not use)"] if foreign else []
    extra += [f"{counts['skipped']} instants of long gaps skipped"] if counts["skipped"] else []
    extra += [timeline.summary()] if timeline.summary() else []
    print(f"decoded {span.n} frames ({counts['accepted']} accepted, rejected {rej or 'none'}) "
          f"-> {counts['samples']} samples" + "".join(f", {e}" for e in extra), file=sys.stderr)
    _report_damage(errors, span.n)
    if not span.n:
        return _nothing(args.log, "no CAN frames in the log" + (f" on bus {args.bus}" if args.bus else ""))
    if not counts["accepted"]:
        return _nothing(args.log, f"none of its {span.n} frames is a message of the pack config, or every one "
                                  f"was rejected: {rej or 'none'}")
    if not counts["samples"]:
        return _nothing(args.log, f"its frames span {span.seconds:.3g} s, less than one sample period "
                                  f"({1.0 / args.rate:.3g} s at --rate {args.rate:g})")
    return 0


# ----------------------------------------------------------------------------- --raw


def _fmt(v) -> float | int | str:
    """A decoded value for output: numbers without float noise (0.1 scale), text as it is."""
    if isinstance(v, float):
        return float(f"{v:.10g}") if math.isfinite(v) else str(v)
    return v if isinstance(v, int) else str(v)


class RawDecoder:
    """Every signal of a DBC, frame by frame, with the counts a summary needs."""

    def __init__(self, db, signals: str | None = None) -> None:
        self.by_id = {}
        for m in db.messages:
            names = {s.name for s in m.signals
                     if signals is None or fnmatchcase(s.name, signals) or fnmatchcase(f"{m.name}.{s.name}", signals)}
            if names:
                self.by_id[(m.frame_id, bool(m.is_extended_frame))] = (m, names)
        self.counts: Counter[str] = Counter(dict.fromkeys(("decoded", "values", "unknown_id", "bad_time",
                                                           "decode_error", "error_frame", "dlc_mismatch"), 0))

    def decode(self, msg) -> tuple[object, dict] | None:
        """(DBC message, {signal: value}) of one frame, or None (counted why)."""
        if msg.is_error_frame or msg.is_remote_frame:
            self.counts["error_frame"] += 1
            return None
        if not stamp_ok(msg.timestamp):
            self.counts["bad_time"] += 1
            return None
        entry = self.by_id.get((msg.arbitration_id, bool(msg.is_extended_id)))
        if entry is None:
            self.counts["unknown_id"] += 1
            return None
        m, names = entry
        data = bytes(msg.data)
        if len(data) != m.length:  # decoded anyway: the signals the frame's bytes hold
            self.counts["dlc_mismatch"] += 1
        try:
            values = m.decode(data, decode_choices=False, allow_truncated=True)
        except Exception:  # noqa: BLE001  (a short or malformed frame; cantools raises several types)
            self.counts["decode_error"] += 1
            return None
        values = {k: v for k, v in values.items() if k in names}
        self.counts["decoded"] += 1
        self.counts["values"] += len(values)
        return m, values


def _raw_rows(dec: RawDecoder, msgs) -> Iterator[tuple]:
    for msg in msgs:
        got = dec.decode(msg)
        if got is not None:
            m, values = got
            fid = f"0x{msg.arbitration_id:08X}" if msg.is_extended_id else f"0x{msg.arbitration_id:03X}"
            bus = "" if msg.channel is None else str(msg.channel)
            yield round(float(msg.timestamp), 6), bus, fid, m, values


def _write_raw(rows: Iterator[tuple], fmt: str, out) -> None:
    if fmt == "csv":
        w = csv.writer(out)
        w.writerow(["t", "bus", "id", "message", "signal", "value", "unit"])
        for t, bus, fid, m, values in rows:
            for name, v in values.items():
                w.writerow([f"{t:.6f}", bus, fid, m.name, name, _fmt(v), m.get_signal_by_name(name).unit or ""])
    else:
        for t, bus, fid, m, values in rows:
            out.write(json.dumps({"t": t, "bus": bus, "id": fid, "message": m.name,
                                  "signals": {k: _fmt(v) for k, v in values.items()}}) + "\n")


def run_raw(args: argparse.Namespace) -> int:
    """``--raw``: every DBC signal of every frame, one row per signal value (CSV) or per frame (JSON lines)."""
    from bms_ai.can.dbc import load_dbc

    if not args.dbc:
        raise ValueError("--raw decodes with a DBC: pass --dbc DBC")
    if args.pack_config:
        raise ValueError("--raw decodes every DBC signal without a pack config: drop --pack-config or --raw")
    # raw values read each signal on its own: cantools' strict layout check adds nothing here
    db = load_dbc(args.dbc, strict=False, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    dec = RawDecoder(db, args.signals)
    if not dec.by_id:
        raise ValueError(f"--signals {args.signals!r} matches no signal of {args.dbc}")
    errors: list[str] = []
    timeline = Timeline()
    n = Counter(frames=0)

    def counted(msgs):
        for msg in msgs:
            n["frames"] += 1
            yield msg

    with _output(args) as out:
        _write_raw(_raw_rows(dec, counted(iter_log(args.log, errors, timeline, args.bus))), args.format, out)
    c = dec.counts
    skipped = {k: c[k] for k in ("unknown_id", "bad_time", "decode_error", "error_frame") if c[k]}
    extra = [f"{c['dlc_mismatch']} frames of another length than the DBC's (the signals they hold decoded)"]
    extra = (extra if c["dlc_mismatch"] else []) + ([timeline.summary()] if timeline.summary() else [])
    print(f"decoded {n['frames']} frames ({c['decoded']} of DBC messages, skipped {skipped or 'none'}) "
          f"-> {c['values']} signal values" + "".join(f", {e}" for e in extra), file=sys.stderr)
    _report_damage(errors, n["frames"])
    if not n["frames"]:
        return _nothing(args.log, "no CAN frames in the log" + (f" on bus {args.bus}" if args.bus else ""))
    if not c["values"]:
        return _nothing(args.log, f"none of its {n['frames']} frames carries a {'selected ' * bool(args.signals)}"
                                  f"signal of {args.dbc}: skipped {skipped or 'none'}")
    return 0
