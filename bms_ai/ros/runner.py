"""`bms-ai run`: the whole graph in one process, for machines without ros2 launch.

Same NodeSpecs as the launch file; nodes share one context and one
executor, so there is no per-process overhead. The executor is single-threaded
on purpose: every callback is short (CAN reading and uploads run on their own
threads), and rclpy's MultiThreadedExecutor (Jazzy) was measured 25x slower
here, its dispatch loop starving callbacks under /clock traffic.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bms_ai.graph import (
    DEFAULT_NAMESPACE,
    NODES,
    NodeSpec,
    build_graph,
    default_params_file,
    merge_overrides,
    node_parameters,
    pack_overrides,
    replay_overrides,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default=str(default_params_file()), help="ROS 2 params file")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--nodes", default=",".join(n for n, _, _ in NODES), help="comma-separated nodes to start")
    p.add_argument("--can-log", help="replay this CAN log through can_bridge (sim time from the log)")
    p.add_argument("--speed", type=float, default=1.0, help="replay speed; 0 = as fast as possible")
    p.add_argument("--pack-config", help="pack config YAML; sets can_bridge's signal map and every node's pack id, "
                   "chemistry and capacity")
    p.add_argument("--interface", help="python-can interface for can_bridge")
    p.add_argument("--channel", help="CAN channel for can_bridge")
    p.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=JSON",
                   help="override a parameter, e.g. --set can_bridge.rate_hz=20")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = run until Ctrl-C)")


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        node, dot, param = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set expects NODE.PARAM=VALUE, got '{item}'")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(node, {})[param] = value
    return out


def graph_from_args(args: argparse.Namespace) -> list[NodeSpec]:
    overrides = parse_sets(args.set)
    if getattr(args, "pack_config", None):
        overrides = merge_overrides(pack_overrides(args.pack_config), overrides)
    bridge = overrides.setdefault("can_bridge", {})
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    sim_time = None
    if args.can_log:
        bridge.update(replay_overrides(args.can_log, args.speed, nodes))
        sim_time = True
    if args.interface:
        bridge["interface"] = args.interface
    if args.channel:
        bridge["channel"] = args.channel
    return build_graph(args.namespace, nodes, overrides, use_sim_time=sim_time)


class GraphRunner:
    """Instantiates the graph's nodes in-process and spins them."""

    def __init__(self, specs: list[NodeSpec], params_file: str | None) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter import Parameter

        self._rclpy = rclpy
        self.context = Context()
        rclpy.init(context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.nodes = []
        try:
            for spec in specs:
                cls = importlib.import_module(spec.module).NODE_CLASS
                params = node_parameters(spec, params_file)
                node = cls(node_name=spec.name, namespace=spec.namespace, context=self.context,
                           parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
                self.nodes.append(node)
                self.executor.add_node(node)
        except BaseException:
            self.shutdown()
            raise

    def node(self, name: str):
        return next(n for n in self.nodes if n.get_name() == name)

    def spin(self, until: Callable[[], bool] | None = None, duration: float = 0.0) -> None:
        end = time.monotonic() + duration if duration > 0 else None
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.1):
                if (end is not None and time.monotonic() >= end) or (until is not None and until()):
                    self.executor.shutdown(timeout_sec=0)  # wakes spin()
                    return

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        try:
            self.executor.spin()
        except (KeyboardInterrupt, self._rclpy.executors.ExternalShutdownException):
            pass
        finally:
            stop.set()

    def shutdown(self) -> None:
        for n in self.nodes:
            n.destroy_node()
        self.nodes = []
        self.executor.shutdown(timeout_sec=1.0)
        if self.context.ok():
            self._rclpy.shutdown(context=self.context)


def run(args: argparse.Namespace) -> int:
    specs = graph_from_args(args)
    runner = GraphRunner(specs, args.params)
    print(f"bms-ai run: {', '.join(s.fqn for s in specs)}", file=sys.stderr)
    try:
        runner.spin(duration=args.duration)
    finally:
        runner.shutdown()
    return 0
