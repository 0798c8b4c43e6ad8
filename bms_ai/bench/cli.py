"""`bms-ai bench`: performance figures as JSON, each next to its baseline from the same run.

Sections come from the parts that own them; a section whose part is not
installed is reported as skipped, never invented.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

from bms_ai.core.registry import NotAvailableError, Registry

SECTIONS: Registry = Registry("bench section")
SECTIONS.add("decode", "bms_ai.bench.decode:bench_decode", "CAN decode per frame and offline, BLF reading")
SECTIONS.add("estimator", "bms_ai.bench.estimator:bench", "96-cell estimator cycle next to the EKF")
SECTIONS.add("uplink", "bms_ai.bench.uplink:bench", "MCAP recording and upload next to bare writers")
SECTIONS.add("graph", "bms_ai.bench.graph:bench", "whole graph CPU, latency, replay speed (needs rclpy)")
SECTIONS.add("fleet_sim", "bms_ai.bench.fleet:bench", "fleet simulator vehicle-hours per core-minute (calendar, awake)")
SECTIONS.add("fleet_pipeline", "bms_ai.bench.fleet_pipeline:bench", "fleet ingest + labels on Ray, 1 vs 2 workers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `bms-ai bench` flags."""
    p.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="smaller workloads (for tests)")
    p.add_argument("-o", "--output", help="write the JSON here as well")


def machine() -> dict[str, Any]:
    """Where the figures were taken (Python, CPU, core count): figures mean nothing without it."""
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return info


def run_sections(names: list[str], quick: bool) -> dict[str, Any]:
    """Each named section's figures; a section whose part is not installed is reported as skipped."""
    out: dict[str, Any] = {"machine": machine()}
    for name in names:
        try:
            fn = SECTIONS.get(name)
        except NotAvailableError as exc:
            out[name] = {"skipped": str(exc)}
            continue
        print(f"[bench] {name} ...", file=sys.stderr)
        out[name] = fn(quick=quick)
    return out


def run(args: argparse.Namespace) -> int:
    """`bms-ai bench`: the chosen sections as JSON on stdout (and in --output)."""
    names = [SECTIONS.check(n.strip()) for n in args.only.split(",")] if args.only else SECTIONS.names()
    if args.output and os.path.isdir(args.output):  # before minutes of measuring, not after
        raise ValueError(f"--output {args.output}: is a directory, not a file")
    res = run_sections(names, args.quick)
    text = json.dumps(res, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
