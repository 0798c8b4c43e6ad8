"""`bms-ai simulate`: one recorded drive, a suite, an estimation suite, or an import of real data."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bms_ai.chemistry.registry import CHEMISTRIES
from bms_ai.core.cliargs import nonneg_int, out_dir, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bms-ai simulate` arguments."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--scenario", help="scenario name, bundled:NAME, or a scenario .json file")
    g.add_argument("--suite", choices=["train", "val", "test", "smoke"], help="build a scenario grid")
    g.add_argument("--estimation-suite", choices=["train", "val", "eval"],
                   help="generate an estimation suite of --chemistry (cell-level lives and drives, RecordedDrive v2)")
    g.add_argument("--import-csv", metavar="CSV", help="convert a McMaster/Kollmeyer drive-cycle CSV to the truth schema")
    g.add_argument("--list", action="store_true", help="list named scenarios and suite sizes")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (cell spread, sensors, CAN timing)")
    p.add_argument("--out", type=out_dir, help="output directory")
    p.add_argument("--jobs", type=positive_int, default=1, help="parallel worker processes for --suite / --estimation-suite")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N drives of the suite")
    p.add_argument("--can", default="blf", choices=["blf", "asc", "both", "none"], help="CAN log format(s)")
    p.add_argument("--asc", action="store_true", help="also write can.asc")
    p.add_argument("--chemistry", default="nmc", choices=CHEMISTRIES.names(),
                   help="chemistry family of --estimation-suite; chemistry label for --import-csv")


def _formats(args) -> tuple[str, ...]:
    f = {"blf": ("blf",), "asc": ("asc",), "both": ("blf", "asc"), "none": ()}[args.can]
    if args.asc and "asc" not in f:
        f = f + ("asc",)
    return f


def run(args) -> int:
    """Simulate one scenario, build a suite, list, or import real data; 0 on success."""
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.list:
        from bms_ai.sim.estimation_suite import SUITES, suite_specs
        from bms_ai.sim.scenario import BUNDLED, SCENARIOS
        from bms_ai.sim.suite import SUITE_SIZES

        est = {f"{s}:{c}": len(suite_specs(s, c)) for s in SUITES for c in ("nmc", "lfp")}
        print(json.dumps({"scenarios": sorted(SCENARIOS), "bundled": sorted(f"bundled:{k}" for k in BUNDLED),
                          "suites": SUITE_SIZES, "estimation_suites": est}, indent=2))
        return 0
    if not args.out:
        raise ValueError("--out DIR is required")
    if args.import_csv:
        from bms_ai.sim.importers import import_kollmeyer_csv

        out = import_kollmeyer_csv(args.import_csv, args.out, chemistry=args.chemistry)
        print(f"imported {args.import_csv} -> {out}", file=sys.stderr)
        return 0
    if args.estimation_suite:
        from bms_ai.sim.estimation_suite import build_estimation_suite

        summary = build_estimation_suite(args.estimation_suite, args.chemistry, args.out, jobs=args.jobs, limit=args.limit)
        print(json.dumps(summary))
        return 1 if summary["failed"] else 0
    if args.suite:
        from bms_ai.sim.suite import build_suite

        summary = build_suite(args.suite, args.out, jobs=args.jobs, formats=_formats(args), limit=args.limit)
        print(json.dumps(summary))
        return 1 if summary["failed"] else 0
    from bms_ai.sim.io import write_drive
    from bms_ai.sim.simulator import simulate_drive

    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    drive = simulate_drive(args.scenario, args.seed, progress=say)
    say(f"encoding CAN ({', '.join(_formats(args)) or 'none'}) and writing truth")
    out = write_drive(drive, args.out, _formats(args))
    wall = time.perf_counter() - t0
    say(f"done: {drive.duration_s / 60:.1f} min of driving in {wall:.1f} s "
        f"({drive.duration_s / 3600 / (wall / 60):.2f} h driving per minute) -> {out}")
    return 0
