"""Fault-evaluation drive suite: fault-free and injected-fault drives from the data factory.

``python -m bms_ai.diagnostics.suite OUT_DIR [--quick]`` writes one recorded
drive directory per case (can.blf + truth.parquet + meta.json via
bms_ai.sim.io.write_drive). Severities span the issue's specified range
(internal short down to 100 ohm) so the report shows where detection ends.
Deterministic: fixed seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path


def cases(quick: bool = False) -> list[tuple[str, object, int]]:
    """(name, scenario, seed) of every drive in the suite; ``quick`` keeps fewer severities."""
    from bms_ai.sim.scenario import Fault, Phase, Scenario

    udds2 = [Phase("drive", "udds", repeats=2.0)]
    drive_rest = [Phase("drive", "udds", repeats=1.0), Phase("rest", duration_s=600.0),
                  Phase("drive", "hwfet", repeats=1.0)]

    def sc(name: str, segs=None, **kw) -> Scenario:
        return Scenario(name=name, chemistry=kw.pop("chemistry", "nmc"), segments=list(segs or udds2), **kw)

    out: list[tuple[str, object, int]] = []
    # fault-free
    for seed in range(3 if quick else 4):
        out.append((f"ff_udds_s{seed}", sc(f"ff_udds_s{seed}"), seed))
    out.append(("ff_drive_rest", sc("ff_drive_rest", drive_rest), 11))
    out.append(("ff_us06_cold", sc("ff_us06_cold", [Phase("drive", "us06", repeats=2.0)], ambient_c=-5.0, soc0=0.9), 12))
    out.append(("ff_hwfet_aged", sc("ff_hwfet_aged", [Phase("drive", "hwfet", repeats=2.0)], soh=0.85), 13))
    out.append(("ff_charge", sc("ff_charge", [Phase("rest", duration_s=60), Phase("charge", c_rate=0.5, soc_target=0.9,
                                                                                         duration_s=3600),
                                              Phase("rest", duration_s=600)], soc0=0.3), 14))
    if not quick:
        out.append(("ff_lfp_udds", sc("ff_lfp_udds", chemistry="lfp", soc0=0.7), 15))
    # internal short: R_ISC ohm, onset 300 s
    for r in ((2.0, 10.0, 100.0) if quick else (2.0, 5.0, 10.0, 30.0, 100.0)):
        out.append((f"isc_{r:g}ohm", sc(f"isc_{r:g}ohm", faults=[Fault("isc", onset_s=300.0, cell=17, magnitude=r)]), 20))
    # abnormal self-discharge (growing imbalance): leak A
    for a in ((0.5,) if quick else (0.2, 0.5, 1.0)):
        out.append((f"sd_{a:g}A", sc(f"sd_{a:g}A", drive_rest,
                                     faults=[Fault("self_discharge", onset_s=300.0, cell=63, magnitude=a)]), 21))
    # thermal anomaly: extra heat W
    for w in ((3.0,) if quick else (1.5, 3.0, 6.0)):
        out.append((f"thermal_{w:g}W", sc(f"thermal_{w:g}W", faults=[Fault("thermal", onset_s=300.0, cell=40,
                                                                             magnitude=w)]), 22))
    # lithium plating: fast charge in the cold (label from the anode potential)
    for amb, c in (((-10.0, 1.0),) if quick else ((-10.0, 1.0), (0.0, 1.5))):
        name = f"plating_{amb:g}C_{c:g}C"
        out.append((name, sc(name, [Phase("rest", duration_s=60), Phase("charge", c_rate=c, soc_target=0.8,
                                                                             duration_s=1800),
                                    Phase("rest", duration_s=600)], ambient_c=amb, soc0=0.2), 23))
    # sensor faults (rules)
    out.append(("sensor_faults", sc("sensor_faults", faults=[
        Fault("sensor_stuck", onset_s=200.0, cell=5, target="cell_v"),
        Fault("open_wire", onset_s=900.0, cell=60, target="cell_v"),
        Fault("can_timeout", onset_s=1500.0, target="BMS_CellTemps", duration_s=5.0)]), 24))
    return [(n, replace(s), seed) for n, s, seed in out]


def main(argv: list[str] | None = None) -> int:
    """Simulate the missing drives of the suite into OUT_DIR."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter cases")
    ap.add_argument("--only", nargs="*", default=None, help="case names to (re)generate")
    a = ap.parse_args(argv)
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
    from bms_ai.sim.io import write_drive
    from bms_ai.sim.simulator import simulate_drive

    a.out.mkdir(parents=True, exist_ok=True)
    for name, scen, seed in cases(a.quick):
        if a.only and name not in a.only:
            continue
        d = a.out / name
        if (d / "meta.json").exists() and not a.only:
            continue
        t0 = time.perf_counter()
        try:
            drive = simulate_drive(scen, seed=seed)
            write_drive(drive, d)
        except Exception as exc:  # one bad case must not stop the suite
            print(f"{name}: FAILED {exc!r}", file=sys.stderr, flush=True)
            continue
        print(f"{name}: {drive.duration_s:.0f} s simulated in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
