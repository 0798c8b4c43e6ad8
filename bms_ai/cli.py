"""`bms-ai` command: one entry point, subcommands implemented in their own modules.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``
and is imported only when used, so `bms-ai decode` never loads rclpy or PyBaMM.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("bms_ai.runner", "run the whole node graph in one process"),
    "demo": ("bms_ai.demo", "main job: replay a bundled drive through the graph, live view, report"),
    "replay": ("bms_ai.can.replay_cli", "put a CAN log on a bus (optionally publishing /clock)"),
    "decode": ("bms_ai.can.decode_cli", "decode a CAN log into pack samples (csv/jsonl)"),
    "simulate": ("bms_ai.sim.cli", "simulate a recorded drive (CAN log + truth) or a suite"),
    "train": ("bms_ai.training.cli", "train SOC/SOH/fault models and export ONNX"),
    "evaluate": ("bms_ai.evaluate", "compare estimators/detectors on held-out drives"),
    "bench": ("bms_ai.bench", "performance figures as JSON, with baselines"),
    "ingest-server": ("bms_ai.uplink.ingest_server", "reference cloud ingest service (HTTP)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bms-ai", description="AI battery management for vehicles (ROS 2).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if only == name:
            importlib.import_module(mod).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in COMMANDS else None
    if name is not None:
        try:
            module = importlib.import_module(COMMANDS[name][0])
        except ImportError as exc:
            print(f"bms-ai {name}: not available ({exc}); see README for the optional extras", file=sys.stderr)
            return 2
    args = build_parser(only=name).parse_args(argv)
    if name is None:
        build_parser().print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:  # config/input errors carry their own message
        print(f"bms-ai {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
