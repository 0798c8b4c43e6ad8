"""`bms-ai train TASK ...`: reproducible (seeded) training with progress and ONNX export.

Each task lives in the module that owns it and exposes ``add_arguments`` and
``run`` like the top-level subcommands; the table below only names them.
"""

from __future__ import annotations

import argparse
import os

from bms_ai.chemistry.registry import CHEMISTRIES
from bms_ai.core.cliargs import nonneg_int, out_dir
from bms_ai.core.registry import Registry

TASKS: Registry = Registry("training task")
TASKS.add("synth", "bms_ai.training.synth:", "make cell-level PyBaMM drives for SOC training")
TASKS.add("soc", "bms_ai.training.soc:", "train and calibrate the overpotential model, export ONNX into the model directory")
TASKS.add("ecm", "bms_ai.training.ecm:", "identify and calibrate the classical overpotential fallback (prints it)")
TASKS.add("soh", "bms_ai.training.health:", "measure the classical SOH estimator on simulated aged packs")
TASKS.add("rul", "bms_ai.training.health:", "fit and evaluate the RUL fade-law estimator")
TASKS.add("faults", "bms_ai.diagnostics.train:", "calibrate the fault detectors and train the plating model")


def seed_list(spec: str) -> list[int]:
    """'100-129,200' -> [100, ..., 129, 200]."""
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def add_common(p: argparse.ArgumentParser, data_required: bool = False) -> None:
    """Arguments most tasks share."""
    p.add_argument("--chemistry", default="nmc", choices=CHEMISTRIES.names())
    p.add_argument("--data", nargs="*", default=[], required=data_required,
                   help="drive directories (or parents of drives)")
    p.add_argument("--out", type=out_dir, default="models", help="model directory (manifest.json is updated)")
    p.add_argument("--seed", type=nonneg_int, default=0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One sub-subcommand per task (task modules import torch/PyBaMM only when they run)."""
    TASKS.add_subcommands(p, "task")


def run(args: argparse.Namespace) -> int:
    """Run the chosen task (single-threaded math libraries for reproducibility)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
    return int(TASKS.get(args.task).run(args) or 0)
