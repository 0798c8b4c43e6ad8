"""`bms-ai decode LOG --dbc DBC [--pack-config YAML] [--format csv|jsonl]`."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext

from bms_ai.can.assembler import REJECT_REASONS
from bms_ai.can.decoder import PackDecoder
from bms_ai.can.frames import FrameArrays
from bms_ai.can.logs import read_log_chunks
from bms_ai.can.offline import SampleTable, decode_chunks
from bms_ai.can.packconfig import load_pack_config
from bms_ai.core.paths import default_pack_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The decode subcommand's options."""
    p.add_argument("log", help="CAN log (.asc .blf .log .trc .csv .mf4)")
    p.add_argument("--dbc", help="DBC file (default: the pack config's)")
    p.add_argument("--pack-config", default=str(default_pack_config()), help="pack config YAML")
    p.add_argument("--no-strict", action="store_true", help="load a DBC that cantools rejects in strict mode")
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    p.add_argument("--rate", type=float, default=10.0, help="samples per second of CAN time")
    p.add_argument("--max-age", type=float, default=1.0, help="values older than this (s) are written as NaN")
    p.add_argument("-o", "--output", help="output file (default: stdout)")


def _num(v: float) -> float | None:
    return None if not math.isfinite(v) else round(float(v), 6)


def write_table(t: SampleTable, fmt: str, out, header: bool = True) -> None:
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


def run(args: argparse.Namespace) -> int:
    """``bms-ai decode``: samples to a file or stdout, a one-line summary on stderr.

    Exit status 0: the whole log read and frames decoded; 1: bad input, a
    damaged or truncated log (the samples before the damage are written, a
    ``warning:`` line names it) or nothing valid decoded (no frame accepted).
    """
    cfg = load_pack_config(args.pack_config, dbc=args.dbc)
    if args.no_strict:
        from dataclasses import replace

        cfg = replace(cfg, dbc_strict=False)
    dec = PackDecoder(cfg)
    errors: list[str] = []
    n_frames: list[int] = [0]
    counts: Counter[str] = Counter()
    rejected: Counter[str] = Counter(dict.fromkeys(REJECT_REASONS, 0))
    # streamed chunk by chunk: memory flat in the log's length
    chunks = _counted(read_log_chunks(args.log, errors=errors), n_frames)
    with (open(args.output, "w", newline="") if args.output else nullcontext(sys.stdout)) as out:
        for table in decode_chunks(chunks, dec, 1.0 / args.rate, args.max_age):
            write_table(table, args.format, out, header=not counts["chunks"])
            counts.update(chunks=1, samples=len(table), accepted=table.accepted, skipped=table.skipped)
            rejected.update(table.rejected)
        if not counts["chunks"]:  # not one frame: still the CSV header
            write_table(next(decode_chunks([FrameArrays.empty()], dec, 1.0)), args.format, out)
    rej = {k: v for k, v in rejected.items() if v}
    gaps = f", {counts['skipped']} instants of long gaps skipped" if counts["skipped"] else ""
    print(f"decoded {n_frames[0]} frames ({counts['accepted']} accepted, rejected {rej or 'none'}) "
          f"-> {counts['samples']} samples{gaps}", file=sys.stderr)
    for err in errors:
        print(f"warning: {err}", file=sys.stderr)
    if not counts["accepted"]:
        print(f"warning: {args.log}: nothing decoded (no frame of the pack config accepted)", file=sys.stderr)
    return 0 if counts["accepted"] and not errors else 1


def _counted(chunks: Iterator[FrameArrays], n: list[int]) -> Iterator[FrameArrays]:
    for frames in chunks:
        n[0] += len(frames)
        yield frames
