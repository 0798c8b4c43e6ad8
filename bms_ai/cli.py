"""`bms-ai` command: one entry point, subcommands implemented in the rooms that own them.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``
and is imported only when used, so `bms-ai decode` never loads rclpy or PyBaMM.
"""

from __future__ import annotations

import argparse
import os
import sys

from bms_ai.core.registry import NotAvailableError, Registry

DEBUG_ENV = "BMS_AI_DEBUG"  # '1': an unexpected error raises with its traceback instead of one line
COMMANDS: Registry = Registry("command")
COMMANDS.add("run", "bms_ai.ros.runner:", "run the whole node graph in one process")
COMMANDS.add("demo", "bms_ai.ros.demo:", "main job: replay a bundled drive through the graph, live view, report")
COMMANDS.add("replay", "bms_ai.ros.replay:", "put a CAN log on a bus (optionally publishing /clock)")
COMMANDS.add("decode", "bms_ai.can.decode_cli:", "decode a CAN log into pack samples (csv/jsonl)")
COMMANDS.add("pack-config", "bms_ai.can.draft:", "draft a pack config from a vehicle's DBC (and a log)")
COMMANDS.add("simulate", "bms_ai.sim.cli:", "simulate a recorded drive (CAN log + truth) or a suite")
COMMANDS.add("train", "bms_ai.training.cli:", "train SOC/SOH/RUL/fault models and export ONNX")
COMMANDS.add("evaluate", "bms_ai.estimation.evaluate:", "compare estimators/detectors on held-out drives")
COMMANDS.add("bench", "bms_ai.bench.cli:", "performance figures as JSON, with baselines")
COMMANDS.add("ingest-server", "bms_ai.uplink.ingest_server:", "reference cloud ingest service (HTTP)")
COMMANDS.add("fleet", "bms_ai.fleet.cli:", "fleet loop: signed model repository (TUF)")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported to add its arguments."""
    p = argparse.ArgumentParser(prog="bms-ai", description="AI battery management for vehicles (ROS 2).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        sp = sub.add_parser(name, help=COMMANDS.help(name), description=COMMANDS.help(name))
        if only == name:
            COMMANDS.get(name).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bms-ai` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in COMMANDS else None
    if name is not None:
        try:
            module = COMMANDS.get(name)
        except NotAvailableError as exc:
            print(f"bms-ai {name}: {exc}; see README for the optional extras", file=sys.stderr)
            return 2
    args = build_parser(only=name).parse_args(argv)
    if name is None:
        build_parser().print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, ArithmeticError) as exc:  # input, file and number errors carry their own message
        print(f"bms-ai {name}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # anything else still ends in one line; the traceback only on request
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"bms-ai {name}: error: {type(exc).__name__}: {_one_line(exc)} ({DEBUG_ENV}=1 shows where)",
              file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
