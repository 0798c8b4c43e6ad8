"""`bms-ai run`: the whole graph in one process, for machines without ros2 launch.

Same options and NodeSpecs as the launch file (bms_ai.graph.graph_from_options);
nodes share one context and one
executor, so there is no per-process overhead. The executor is single-threaded
on purpose (:func:`bms_ai.nodes.common.make_executor`): every callback is short
(CAN reading and uploads run on their own threads), and rclpy's
MultiThreadedExecutor (Jazzy) was measured 25x slower here, its dispatch loop
starving callbacks under /clock traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from bms_ai.can.sources import SourceError
from bms_ai.graph import OPTIONS, NodeSpec, graph_from_options, node_parameters, parse_options


def align_timers(nodes: list[Any]) -> None:
    """Restart every running timer of ``nodes`` now: timers of one period then fire together.

    Each node's 1 Hz diagnostics (and the other periodic timers) started when
    its node was made, tens to hundreds of ms apart, so the executor woke once
    per timer; fired together they take one wake-up (the composed graph at
    nominal traffic: ~18 -> ~11 executor wake-ups a second).
    """
    for node in nodes:
        for timer in node.timers:
            if not timer.is_canceled():
                timer.reset()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `bms-ai run` flags: the graph's option table (launch arguments of the same names)."""
    for opt in OPTIONS:
        if not opt.run:
            continue
        if opt.repeat:
            p.add_argument(*opt.run_flags, dest=opt.name, action="append", default=[], metavar="NODE.PARAM=VALUE",
                           help=opt.help)
        else:
            shown = f" (default: {opt.default})" if opt.default else ""
            p.add_argument(*opt.run_flags, dest=opt.name, default=opt.default, metavar=opt.name.upper(),
                           help=opt.help + shown)


def options_from_args(args: argparse.Namespace) -> dict[str, str]:
    """Parsed `bms-ai run` arguments as option text, the same form the launch file hands over."""
    out = {}
    for opt in OPTIONS:
        if opt.run and hasattr(args, opt.name):
            value = getattr(args, opt.name)
            out[opt.name] = shlex.join(value) if opt.repeat else value
    return out


class GraphRunner:
    """Instantiates the graph's nodes in-process and spins them."""

    def __init__(self, specs: list[NodeSpec]) -> None:
        import rclpy
        from rclpy.context import Context

        from bms_ai.nodes.common import make_executor
        from bms_ai.nodes.local import LocalTopics

        self._rclpy = rclpy
        self.context = Context()
        rclpy.init(context=self.context)
        self.executor = make_executor(self.context)
        self.nodes = []
        # topics published by a node of this graph reach its other nodes without DDS (bms_ai.nodes.local)
        self.local = LocalTopics.attach(self.context)
        try:
            for spec in specs:
                node = self._make_node(spec)
                self.nodes.append(node)
                self.executor.add_node(node)
                _check_declared(node, spec)
            if self.local is not None:
                self.local.finalize()
            align_timers(self.nodes)
        except BaseException:
            self.shutdown()
            raise

    def _make_node(self, spec: NodeSpec) -> Any:
        from rclpy.parameter import Parameter

        cls = importlib.import_module(spec.module).NODE_CLASS
        overrides = []
        for k, v in node_parameters(spec).items():
            try:
                overrides.append(Parameter(k, value=v))
            except (TypeError, ValueError) as exc:  # a value no ROS parameter can hold (mapping, mixed list)
                raise ValueError(f"{spec.fqn}: parameter {k}: {exc}") from None
        return cls(node_name=spec.name, namespace=spec.namespace, context=self.context, parameter_overrides=overrides)

    def node(self, name: str) -> Any:
        """The running node called ``name`` (first match over namespaces)."""
        return next(n for n in self.nodes if n.get_name() == name)

    def spin(self, until: Callable[[], bool] | None = None, duration: float = 0.0, poll_s: float = 0.1) -> None:
        """Spin until ``until()`` holds, ``duration`` seconds pass (0 = no limit) or Ctrl-C.

        Can be called again to go on. An exception raised by ``until`` stops
        the spin and is raised here. ``until`` and the end are checked every
        ``poll_s`` (each check wakes two threads).
        """
        from bms_ai.nodes.common import spin_executor

        end = time.monotonic() + duration if duration > 0 else None

        def done() -> bool:
            return (end is not None and time.monotonic() >= end) or (until is not None and until())

        with contextlib.suppress(KeyboardInterrupt, self._rclpy.executors.ExternalShutdownException):
            spin_executor(self.executor, self.context, done, period_s=poll_s)

    def shutdown(self) -> None:
        """Destroy the nodes and this runner's context (idempotent)."""
        for n in self.nodes:
            n.destroy_node()
        self.nodes = []
        self.executor.shutdown(timeout_sec=1.0)
        from bms_ai.nodes.local import LocalTopics

        LocalTopics.detach(self.context)
        if self.context.ok():
            self._rclpy.shutdown(context=self.context)


def _check_declared(node: Any, spec: NodeSpec) -> None:
    """A parameter set on purpose (--set, pack config, replay) that the node does not declare is a typo."""
    unknown = sorted(k for k in spec.parameters if not node.has_parameter(k))
    if unknown:
        raise ValueError(f"{spec.fqn} has no parameter {', '.join(unknown)} "
                         f"(ros2 param list {spec.fqn} shows the declared ones)")


def run(args: argparse.Namespace) -> int:
    """`bms-ai run`: build the graph from the options, spin until the duration ends or Ctrl-C."""
    options = options_from_args(args)
    specs = graph_from_options(options)
    duration = parse_options(options)["duration"]
    try:
        runner = GraphRunner(specs)
    except SourceError as exc:  # e.g. --can-log names no file: a usage error, one line
        print(f"bms-ai run: error: {exc}", file=sys.stderr)
        return 2
    print(f"bms-ai run: {', '.join(s.fqn for s in specs)}", file=sys.stderr)
    from bms_ai.nodes.common import SIGNAL_POLL_S, ShutdownSignals

    signals = ShutdownSignals().install()
    signals.spinning = True
    try:
        runner.spin(until=lambda: signals.stopping, duration=duration, poll_s=SIGNAL_POLL_S)
        # a CAN reader that stopped for good (an unreadable or damaged log) is the run's failure, not a clean end
        failed = [f"{n.get_fully_qualified_name()}: CAN reader stopped: {n.reader_failed}"
                  for n in runner.nodes if getattr(n, "reader_failed", "")]
    finally:
        signals.shutting_down()
        try:
            runner.shutdown()
        finally:
            signals.restore()
    if failed:
        print(f"bms-ai run: error: {' '.join(failed[0].split())}", file=sys.stderr)
        return 1
    return 0
