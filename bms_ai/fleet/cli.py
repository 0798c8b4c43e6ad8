"""`bms-ai fleet COMMAND`: the fleet loop's commands, each implemented in the module that owns it.

Like the top-level `bms-ai`, a table of names (``FLEET``) points lazily at
modules exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse

from bms_ai.core.registry import Registry

FLEET: Registry = Registry("fleet command")
FLEET.add("tuf", "bms_ai.fleet.tuf_cli:", "signed model repository (TUF): init, publish, refresh, serve")
FLEET.add("simulate", "bms_ai.fleet.simulator:", "simulate a fleet of vehicles for days (fitted cell types, 1 Hz)")
FLEET.add("ingest", "bms_ai.fleet.pipeline:IngestCommand", "uploaded segments -> Parquet timelines (Ray Data)")
FLEET.add("label", "bms_ai.fleet.pipeline:LabelCommand", "timelines -> pseudo-labels, SOH trends, anomaly ranking")
FLEET.add("train", "bms_ai.fleet.learn:TrainCommand", "learn a candidate (cell types' OCV curves) from pseudo-labelled vehicles")
FLEET.add("gate", "bms_ai.fleet.gate:GateCommand", "candidate vs current models on held-out vehicles: accept or refuse")
FLEET.add("demo", "bms_ai.fleet.demo:", "one turn of the loop, measured: a week, pipeline, learn, gate, TUF, another week")
FLEET.add("publish", "bms_ai.fleet.gate:PublishCommand", "sign and publish a candidate the gate accepted")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One sub-parser per fleet command."""
    FLEET.add_subcommands(p, "fleet_command")


def run(args: argparse.Namespace) -> int:
    """Run the chosen fleet command."""
    return int(FLEET.get(args.fleet_command).run(args) or 0)
