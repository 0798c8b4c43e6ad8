"""`bms-ai train {soc,soh,rul,synth,faults}`: reproducible training (seeded) with progress, ONNX export."""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path


def _seeds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=["soc", "tune", "soh", "rul", "synth", "faults"],
                   help="soc: train + export ONNX; tune: fit the NN+CC filter on the model's validation drives; synth: make cell-level PyBaMM drives; faults: diagnostics")
    p.add_argument("--chemistry", default="nmc", choices=["nmc", "lfp"])
    p.add_argument("--data", nargs="*", default=[], help="drive directories (or parents of drives)")
    p.add_argument("--out", default="models", help="model directory (manifest.json is updated) or synth output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-drives", type=int, default=None)
    p.add_argument("--seeds", default="100-129", help="synth: drive seeds, e.g. 100-129,200, or 'eval' for the held-out condition suite")
    p.add_argument("--duration", type=float, default=3600.0, help="synth: seconds per drive")
    p.add_argument("--cells", type=int, default=2, help="synth: cells per drive")
    p.add_argument("--report", default="reports/estimation/health", help="soh/rul: report directory")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
    if args.task == "faults":
        try:
            mod = importlib.import_module("bms_ai.diagnostics.training")
        except ImportError as exc:
            print(f"fault-model training not available: {exc}")
            return 2
        return int(mod.run(args) or 0)
    if args.task == "synth":
        from .synth import make_eval_suite, make_suite

        if args.seeds == "eval":
            make_eval_suite(args.chemistry, Path(args.out), duration=args.duration, n_cells=args.cells)
            return 0
        make_suite(args.chemistry, Path(args.out), _seeds(args.seeds), n_cells=args.cells, duration=args.duration)
        return 0
    if args.task in ("soh", "rul"):
        from .health import train_health

        # soh: --data = where the simulated aged drives go (reused when present); rul: --out gets the params
        entry = train_health(args.task, args.chemistry, args.data, Path(args.out), seed=args.seed,
                             report=args.report)
        print(json.dumps(entry, indent=1))
        return 0
    if not args.data:
        raise ValueError("--data DIR is required")
    if args.task == "soc":
        from .soc import train_soc

        entry = train_soc(args.chemistry, args.data, Path(args.out), seed=args.seed, epochs=args.epochs,
                          max_drives=args.max_drives)
    elif args.task == "tune":
        from ..models.manifest import read_manifest, upsert_entry
        from .tune import tune

        res = tune(args.chemistry, Path(args.out), args.data)
        entries, _ = read_manifest(Path(args.out))
        entry = max((e for e in entries if e.key == ("soc", args.chemistry)), key=lambda e: e.version)
        entry.extra["fusion"] = {"r_scale": res["r_scale"], "q_soc": res["q_soc"]}
        entry.metrics.update({f"tuned_{k}": v for k, v in res.items()})
        upsert_entry(Path(args.out), entry)
        entry = entry.to_dict()
    print(json.dumps({k: entry[k] for k in ("name", "version", "file", "sha256", "params", "metrics")}, indent=1))
    return 0
