"""Shared node plumbing: parameters with descriptors, QoS, diagnostics, main()."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, ParameterException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from bms_ai.can.sources import SourceError
from bms_ai.core.cdr import StatusTuple, diagnostic_array_bytes
from bms_ai.core.levels import status_name
from bms_ai.graph import check_parameter, coerce_parameter, describe_limit, pack_hardware_id
from bms_ai.nodes.local import guarded

# REP-2003: publishers reliable; subscribers sensor-data QoS (compatible with both).
PUB_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
SUB_QOS = qos_profile_sensor_data
DIAG_QOS = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
# Maximum-speed log replay: nothing may be dropped, the publisher waits for reliable readers.
LOSSLESS_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
# Subscribers in our own graph: reliable KEEP_ALL, so a file replay is flow-controlled end to end
# (a full reader history holds the writer back instead of dropping). Compatible with both publishers above.
GRAPH_SUB_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)


def declare(node: Node, name: str, default: Any, description: str, read_only: bool = True) -> Any:
    """Declare a parameter with a descriptor and return its value.

    The declared default is the parameter's only home. An override of another
    type (params file, launch, ``--set``, ``-p``) is coerced as
    :func:`bms_ai.graph.coerce_parameter` allows (``rate_hz: 20`` for a double)
    or rejected with a one-line ValueError naming node and parameter, instead
    of rclpy's InvalidParameterTypeException traceback; a value outside
    :data:`bms_ai.graph.PARAMETER_LIMITS` (``rate_hz: 0``) likewise, before
    the node divides by it.
    """
    descriptor = ParameterDescriptor(description=describe_limit(name, description), read_only=read_only)
    try:
        value = node.declare_parameter(name, default, descriptor).value
    except InvalidParameterTypeException:
        # Read the override as given (dynamically typed), then declare again statically with the coerced value.
        given = node.declare_parameter(name, None, ParameterDescriptor(dynamic_typing=True)).value
        node.undeclare_parameter(name)
        try:
            value = coerce_parameter(name, given, default)
        except ValueError as exc:
            raise ValueError(f"{node.get_fully_qualified_name()}: {exc}") from None
        value = node.declare_parameter(name, value, descriptor, ignore_override=True).value
    try:
        return check_parameter(name, value)
    except ValueError as exc:
        raise ValueError(f"{node.get_fully_qualified_name()}: {exc}") from None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def key_values(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Diagnostic values as text, floats short and NaN spelled the same everywhere."""
    return [(str(k), _fmt(v)) for k, v in values.items()]


class Diagnostics:
    """One DiagnosticStatus per check, published at 1 Hz and at once on a level change.

    Names follow diagnostic_updater: ``<node name>: <check>``; hardware_id is
    the pack id, qualified by the node's namespace outside ``/bms``
    (:func:`bms_ai.graph.pack_hardware_id`), so two packs never share one.
    """

    def __init__(self, node: Node, pack_id: str, period: float = 1.0, topic: str = "/diagnostics") -> None:
        self._node = node
        self.hardware_id = pack_hardware_id(pack_id, node.get_namespace())
        self._pub = node.create_publisher(DiagnosticArray, topic, DIAG_QOS)
        self._status: dict[str, tuple[int, str, dict[str, Any]]] = {}  # name -> (level, message, values)
        self._pending: list[str] | None = None  # inside batch(): changed names, published once at the end
        self._names: dict[str, str] = {}  # check -> status name
        self._timer = node.create_timer(period, guarded(node, self.publish))

    @contextlib.contextmanager
    def batch(self):
        """Group updates: the level changes inside go out as one DiagnosticArray, not a burst."""
        self._pending = []
        try:
            yield self
        finally:
            changed, self._pending = self._pending, None
            if changed:
                self.publish(changed)

    def update(self, check: str, level: int, message: str, values: dict[str, Any] | None = None,
               publish_on_change: bool = True) -> None:
        """Set a check's status; a level change goes out at once (or with the batch) unless told otherwise.

        The message is built when published (1 Hz or on a change), not on
        every update: nodes update at their sample rate.
        """
        name = self.name(check)
        prev = self._status.get(name)
        lv = level[0] if isinstance(level, bytes) else int(level)
        self._status[name] = (lv, message, dict(values) if values else {})
        if publish_on_change and (prev is None or prev[0] != lv):
            if self._pending is not None:
                self._pending.append(name)
            else:
                self.publish([name])

    def level(self, check: str) -> int | None:
        """The check's current level, None before its first update."""
        st = self._status.get(self.name(check))
        return None if st is None else st[0]

    def name(self, check: str) -> str:
        """The status name of ``check`` from this node (kept: nodes update every check at their sample rate)."""
        name = self._names.get(check)
        if name is None:
            name = self._names[check] = status_name(self._node.get_name(), check)
        return name

    def publish(self, names: Iterable[str] | None = None) -> None:
        """Send the named statuses (all by default; the 1 Hz timer), stamped with the node clock."""
        keys = list(self._status) if names is None else [k for k in names if k in self._status]
        if not keys:
            return
        sec, nanosec = self._node.get_clock().now().seconds_nanoseconds()
        # serialized here (bms_ai.core.cdr): no DiagnosticStatus and KeyValue objects per status and value
        self._pub.publish(diagnostic_array_bytes(sec, nanosec, [self._status_tuple(k) for k in keys]))

    def _status_tuple(self, name: str) -> StatusTuple:
        level, message, values = self._status[name]
        return level, name, message, self.hardware_id, key_values(values)


EXECUTOR_ENV = "BMS_AI_EXECUTOR"  # 'single' forces rclpy's SingleThreadedExecutor (comparison, debugging)
#: how often a spin stopped by a signal or a duration checks (each check wakes two threads)
SIGNAL_POLL_S = 0.5


def make_executor(context: Any = None) -> Any:
    """The executor every bms_ai process spins: rclpy's EventsExecutor where this rclpy has it.

    It takes ready entities from middleware events instead of rebuilding a
    wait set per callback, which halved the graph's executor CPU at nominal
    traffic (BENCHMARKS.md); rclpy without it (Humble) or ``BMS_AI_EXECUTOR=single``
    gets the SingleThreadedExecutor. Spin it with :func:`spin_executor`.
    """
    if os.environ.get(EXECUTOR_ENV, "events") != "single":
        executor = _events_executor(context)
        if executor is not None:
            return executor
    from rclpy.executors import SingleThreadedExecutor
    return SingleThreadedExecutor(context=context)


def _events_executor(context: Any) -> Any:
    """rclpy's EventsExecutor, or None where it is missing.

    Its constructor enables faulthandler on ``sys.stderr``, which must then be
    a real file: a captured stderr (pytest, an embedding app) gets the
    process's original one for that call.
    """
    try:
        from rclpy.experimental import EventsExecutor
    except ImportError:
        return None
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        if sys.__stderr__ is None:
            return None
        with contextlib.redirect_stderr(sys.__stderr__):
            return EventsExecutor(context=context)
    return EventsExecutor(context=context)


def spin_executor(executor: Any, context: Any = None, done: Callable[[], bool] | None = None,
                  period_s: float = 0.1) -> None:
    """Spin until ``done()`` holds (checked every ``period_s`` on a watcher thread) or the context shuts down.

    ``done`` runs on its own thread, so it is checked on time even while the
    executor works through a backlog; a steady timer in the executor then ends
    the spin. The EventsExecutor's own ``spin()`` busy-waits (a full core in
    rclpy 7.1), ignores ``shutdown()`` from another thread and has no guard
    conditions, hence this. ``done`` raising stops the spin and propagates.
    """
    from rclpy.clock import Clock, ClockType
    from rclpy.task import Future

    ctx = context if context is not None else rclpy.get_default_context()
    # what start-up built (models, DBC routes, rclpy and onnxruntime objects) lives as long as the process:
    # out of the collector's generations, a full collection walks only what the samples allocate
    gc.freeze()
    finished: Future = Future()
    stop = threading.Event()
    failed: list[BaseException] = []
    owner, timer = None, None
    if done is not None:
        def watch() -> None:
            while not stop.wait(period_s):
                try:
                    if done():
                        break
                except Exception as exc:  # noqa: BLE001  (handed to the spinning thread)
                    failed.append(exc)
                    break
            stop.set()

        def end() -> None:
            if stop.is_set() and not finished.done():
                finished.set_result(True)

        owner = next(iter(executor.get_nodes()), None)
        if owner is not None:
            timer = owner.create_timer(period_s, end, clock=Clock(clock_type=ClockType.STEADY_TIME))
        threading.Thread(target=watch, name="bms_ai-spin-watch", daemon=True).start()
    try:
        while ctx.ok() and not finished.done() and not (owner is None and stop.is_set()):
            executor.spin_until_future_complete(finished, timeout_sec=period_s if owner is None else 1.0)
    finally:
        stop.set()
        if timer is not None:
            owner.destroy_timer(timer)
    if failed:
        raise failed[0]


class ShutdownSignals:
    """The first SIGINT/SIGTERM stops the spin; further ones are ignored while the node shuts down.

    A second Ctrl-C (or launch's SIGTERM after its SIGINT) used to raise KeyboardInterrupt inside
    destroy_node, cutting a node mid-flush (the uploader inside fsync). For ``timeout_s`` after shutdown
    starts, extra signals are only reported; after that, one interrupts as usual (a hung shutdown can
    still be stopped). Installed before rclpy.init, so rclpy's own handlers (which wake the executor)
    chain to these.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self.stopping = False
        self.signalled = False  # a signal started (or arrived during) the shutdown
        self.spinning = False  # set while an executor spins with ``done=lambda: self.stopping``
        self.ignored = 0
        self._deadline: float | None = None
        self._saved: dict[int, Any] = {}

    def install(self) -> ShutdownSignals:
        """Take over SIGINT/SIGTERM (only possible in the main thread; elsewhere nothing changes)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._saved[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signalled = True
        if not self.stopping:
            self.stopping = True
            if self.spinning:
                return  # the spin watches ``stopping``: no exception thrown into a callback mid-way
            raise KeyboardInterrupt
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise KeyboardInterrupt  # shutdown overran its time: let this one through
        self.ignored += 1
        with contextlib.suppress(OSError):
            os.write(2, f"[bms_ai] shutting down: {signal.Signals(signum).name} ignored\n".encode())

    def shutting_down(self) -> None:
        """Shutdown starts now: ignore further signals for up to ``timeout_s``."""
        self.stopping = True
        self._deadline = time.monotonic() + self.timeout_s

    def restore(self) -> None:
        """Put the previous handlers back; after a signal-triggered shutdown, ignore further ones instead.

        The process is on its way out then: a late second Ctrl-C must not turn a clean exit into exit -2.
        """
        for sig, old in self._saved.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, signal.SIG_IGN if self.signalled else old)
        self._saved.clear()


#: what a node's construction raises for a configuration it cannot run with (parameters, pack config,
#: files): under `ros2 launch` one line and exit code 1, as `bms-ai run` reports them, not a traceback
CONFIG_ERRORS = (ValueError, OSError, SourceError, ParameterException)


def _config_error(text: str) -> NoReturn:
    """One line '<executable>: error: ...' on stderr, exit code 1 (launch shows both)."""
    print(f"{Path(sys.argv[0]).stem}: error: {' '.join(text.split())}", file=sys.stderr)
    raise SystemExit(1)


def spin_node(node_factory: Callable[[], Node], args: list[str] | None = None,
              shutdown_timeout_s: float = 10.0) -> None:
    """Standard entry point: init, spin until Ctrl-C/SIGTERM or shutdown, clean up.

    Cleanup (destroy_node: the uploader flushes and drains) is not cut by further SIGINT/SIGTERM
    for up to ``shutdown_timeout_s`` (see :class:`ShutdownSignals`).
    """
    signals = ShutdownSignals(shutdown_timeout_s).install()
    node = None
    try:
        try:
            rclpy.init(args=args)
        except Exception as exc:  # noqa: BLE001  (rcl refuses the command line: a params file, a -p rule)
            _config_error(str(exc).split(", at /")[0])  # without rcl's source locations
        try:
            node = node_factory()
        except CONFIG_ERRORS as exc:  # a wrong parameter, pack config, log or directory
            _config_error(str(exc))
        executor = make_executor()
        executor.add_node(node)
        signals.spinning = True
        spin_executor(executor, done=lambda: signals.stopping, period_s=SIGNAL_POLL_S)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        signals.shutting_down()
        try:
            if node is not None:
                node.destroy_node()
            if rclpy.ok():
                rclpy.shutdown()
        finally:
            signals.restore()
