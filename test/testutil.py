"""Helpers shared by tests, in one module.

- loopback ports and polling with a deadline; a deadline, a memory cap and peak memory of a block of code;
- a real mosquitto broker and an MQTT listener;
- a synthetic pack drive encoded into frames of the reference DBC;
- real rclpy in tests: a private context, an executor thread, collecting subscribers,
  diagnostic levels and values. rclpy is imported inside these helpers only, so the
  library tier never loads it;
- fuzzing: JSON-like values for hypothesis and a per-case memory bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import can

    from bms_ai.can.decoder import PackDecoder
    from bms_ai.pack import PackSample


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[tuple[str, Any]]:
    """moto's S3 server on 127.0.0.1 with ``bucket`` created (and emptied, removed after): (endpoint, boto3 client).

    moto keeps buckets per process, so each test names its own bucket.
    """
    import pytest

    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        ep = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        s3.create_bucket(Bucket=bucket)
        try:
            yield ep, s3
        finally:
            for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=obj["Key"])
            s3.delete_bucket(Bucket=bucket)
    finally:
        server.stop()


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` seconds pass; its last value (a bound, not a measurement)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


# ----------------------------------------------------------------------------- MQTT

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


class Broker:
    """A real mosquitto on 127.0.0.1 that tests can stop and restart (outages)."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.port = port
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        """Start the broker and wait until it accepts connections."""
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False
        assert wait_for(up, 10), "mosquitto did not start"
        return self

    def stop(self) -> None:
        """Terminate the broker (an outage for the clients)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None


class Listener:
    """A dashboard: subscribes to everything under the prefix and keeps (topic, payload, retained)."""

    def __init__(self, port: int, prefix: str) -> None:
        self.got: list[tuple[str, str, bool]] = []
        import paho.mqtt.client as mqtt

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{prefix}/#", qos=1)
        c.on_message = lambda cl, u, m: self.got.append((m.topic, m.payload.decode(), bool(m.retain)))
        c.reconnect_delay_set(1, 2)
        c.connect("127.0.0.1", port, 5)
        c.loop_start()
        self.c = c

    def states(self) -> list[dict]:
        """The JSON state messages received so far."""
        return [json.loads(p) for t, p, _ in self.got if t.endswith("/state")]

    def close(self) -> None:
        """Disconnect and stop the client thread."""
        self.c.disconnect()
        self.c.loop_stop()


class DeadlineError(AssertionError):
    """A block of code ran past its deadline (a hang turned into a test failure)."""


@contextlib.contextmanager
def deadline(seconds: float, cpu: bool = False) -> Iterator[None]:
    """Fail instead of hanging: raise :class:`DeadlineError` inside the block after ``seconds`` (main thread).

    ``cpu``: count this process's CPU seconds instead of wall time, so a loaded
    machine cannot fail a case that merely waited for a core (a hang spins the CPU).
    If the signal lands where Python swallows exceptions (a gc callback), the
    error is raised when the block ends instead.
    """
    expired: list[bool] = []

    def expire(signum, frame):
        expired.append(True)
        raise DeadlineError(f"still running after {seconds} {'CPU ' if cpu else ''}s")

    sig, timer = (signal.SIGPROF, signal.ITIMER_PROF) if cpu else (signal.SIGALRM, signal.ITIMER_REAL)
    old = signal.signal(sig, expire)
    signal.setitimer(timer, seconds)
    try:
        yield
    finally:
        signal.setitimer(timer, 0)
        signal.signal(sig, old)
    if expired:
        raise DeadlineError(f"still running after {seconds} {'CPU ' if cpu else ''}s (raised late)")


@contextlib.contextmanager
def memory_cap(extra_bytes: int) -> Iterator[None]:
    """Inside the block the process may grow by at most ``extra_bytes`` of address space (MemoryError beyond).

    Far cheaper than tracemalloc per call, so a fuzz case can afford it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    cap = used + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Peak bytes Python and numpy allocated inside the block (tracemalloc), in the yielded list after it."""
    out: list[int] = []
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield out
    finally:
        out.append(tracemalloc.get_traced_memory()[1] - base)
        if started:
            tracemalloc.stop()


# ----------------------------------------------------------------------------- CAN

def synthetic_sample(t: float, n_cells: int = 96, n_temps: int = 32) -> PackSample:
    """Smoothly varying pack values (distinct per cell) at time t."""
    from bms_ai.pack import PackSample

    cells = 3.6 + 0.002 * np.arange(n_cells) / n_cells + 0.05 * np.sin(0.3 * t + np.arange(n_cells) * 0.01)
    temps = 25.0 + 0.1 * np.arange(n_temps) + 2.0 * np.sin(0.05 * t)
    s = PackSample.empty(n_cells, n_temps)
    s.cell_voltages[:] = cells
    s.cell_temperatures[:] = temps
    s.pack_voltage = float(cells.sum())
    s.pack_current = float(-50.0 * np.sin(0.2 * t))
    s.status = {"bms_state": 3.0, "contactor_plus": 1.0, "contactor_minus": 1.0}
    return s


_ENCODED: dict[tuple, list[tuple[float, int, bool, bytes]]] = {}


def synthetic_messages(decoder: PackDecoder, t0: float, t1: float) -> list[can.Message]:
    """Every frame the reference pack sends in [t0, t1), per the DBC cycle times (fresh objects each call)."""
    import can

    from bms_ai.can.encoder import PackEncoder

    key = (decoder.cfg.source, decoder.cfg.dbc_path, t0, t1)
    if key not in _ENCODED:  # encoding is the slow part; tests may modify the messages they get
        enc = PackEncoder(decoder)
        _ENCODED[key] = [(t, *enc.frame_id(name), enc.encode(name, mux, synthetic_sample(t)))
                         for t, name, mux in enc.schedule(t0, t1)]
    return [can.Message(timestamp=t, arbitration_id=fid, is_extended_id=ext, data=data, channel=0)
            for t, fid, ext, data in _ENCODED[key]]


def write_log(path: str | Path, msgs) -> Path:
    """A log file of ``msgs`` in the format its suffix names (python-can's writers)."""
    import can

    with can.Logger(str(path)) as log:
        for m in msgs:
            log.on_message_received(m)
    return Path(path)


# ----------------------------------------------------------------------------- ROS

class RosHarness:
    """Real rclpy for a test: a private context, an executor thread, a probe node that collects topics."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        self._rclpy = rclpy
        self.context = Context()
        rclpy.init(context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.nodes: list[Any] = []
        self.node = self.add(Node("test_probe", context=self.context))
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        with contextlib.suppress(Exception):  # shutdown races
            self.executor.spin()

    def add(self, node: Any) -> Any:
        """Spin ``node`` with the others (it is destroyed on close)."""
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def collect(self, msg_type: type, topic: str) -> list:
        """Every message on ``topic`` from now on, in a list that fills as they arrive (reliable, deep)."""
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        got: list = []
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(msg_type, topic, got.append, qos)
        return got

    @staticmethod
    def wait_for(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
        """:func:`wait_for` with ROS-test defaults."""
        return wait_for(pred, timeout, step)

    def close(self) -> None:
        """Stop spinning, destroy every node, shut the context down."""
        self.executor.shutdown(timeout_sec=2.0)
        for n in self.nodes:
            n.destroy_node()
        self._rclpy.shutdown(context=self.context)
        self._thread.join(timeout=2.0)


def status_level(st) -> int:
    """A DiagnosticStatus's level as an int (rclpy gives the byte field as bytes)."""
    lv = st.level
    return lv[0] if isinstance(lv, (bytes, bytearray)) else int(lv)


def diag_levels(arrays, name: str) -> list[int]:
    """Levels of the status ``name`` over a list of DiagnosticArray messages, in order."""
    return [status_level(st) for a in arrays for st in a.status if st.name == name]


def diag_values(arrays, name: str) -> dict[str, str]:
    """Key/values of the latest status ``name`` in a list of DiagnosticArray messages."""
    for a in reversed(arrays):
        for st in a.status:
            if st.name == name:
                return {kv.key: kv.value for kv in st.values}
    return {}


# ----------------------------------------------------------------------------- fuzzing

FUZZ_DEADLINE_MS = 3000       # per case: a hang guard for hostile input, far above any honest case
FUZZ_MAX_BYTES = 32 << 20     # per case: Python allocations at peak (a billion laughs reaches gigabytes)


def json_like(max_leaves: int = 20):
    """Hypothesis strategy: what a YAML or JSON document can hold (None, bools, numbers, text, lists, mappings)."""
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
               | st.text(max_size=12))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=max_leaves)


def within_memory(fn: Callable[[], Any], max_bytes: int = FUZZ_MAX_BYTES) -> Any:
    """``fn()`` with its peak Python allocation checked against ``max_bytes`` (raised or returned, as fn does)."""
    import tracemalloc

    tracemalloc.start()
    try:
        return fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= max_bytes, f"peak allocation {peak} bytes > {max_bytes}"


# ----------------------------------------------------------------------------- models

def trap_soc_model(model_dir: Path, kind: str, threshold: float, version: int = 1, chemistry: str = "nmc",
                   feature: int = 0):
    """The shipped SOC model with a trap, written to ``model_dir``; returns its manifest entry (not yet listed).

    Rows whose input ``feature`` (0: the current in C) exceeds ``threshold``
    get their first output = NaN (``kind`` "nan") or x 1e30 ("huge"); every
    other row gets the shipped model's answer. The zero smoke input stays
    below any threshold >= 0, so the model passes every load-time check and
    goes live.
    """
    import onnx
    from onnx import helper, numpy_helper

    from bms_ai.core.files import sha256_file
    from bms_ai.models.manifest import read_manifest

    src = Path(__file__).resolve().parents[1] / "models"
    entry = next(e for e in read_manifest(src)[0] if e.key == ("soc", chemistry))
    out = entry.outputs[0].name
    m = onnx.load(str(src / entry.file))
    g = m.graph
    next(n for n in g.node if out in n.output).output[:] = ["trap_raw"]
    x = g.input[0].name
    g.initializer.extend([numpy_helper.from_array(np.array(v, dtype), name) for name, v, dtype in (
        ("trap_start", [feature], np.int64), ("trap_end", [feature + 1], np.int64), ("trap_axis", [1], np.int64),
        ("trap_thr", [threshold], np.float32), ("trap_nan", [np.nan], np.float32), ("trap_big", [1e30], np.float32))])
    g.node.extend([helper.make_node("Slice", [x, "trap_start", "trap_end", "trap_axis"], ["trap_v"]),
                   helper.make_node("Greater", ["trap_v", "trap_thr"], ["trap_on"])])
    if kind == "nan":
        g.node.append(helper.make_node("Where", ["trap_on", "trap_nan", "trap_raw"], [out]))
    else:
        g.node.extend([helper.make_node("Mul", ["trap_raw", "trap_big"], ["trap_huge"]),
                       helper.make_node("Where", ["trap_on", "trap_huge", "trap_raw"], [out])])
    name = f"soc_trap_{kind}"
    f = f"{name}_v{version}.onnx"
    onnx.save(m, str(Path(model_dir) / f))
    entry.name, entry.version, entry.file, entry.sha256 = name, version, f, sha256_file(Path(model_dir) / f)
    return entry


def good_soc_model(model_dir: Path, version: int, chemistry: str = "nmc"):
    """A copy of the shipped SOC model under a new version in ``model_dir`` (entry returned, not yet listed)."""
    from bms_ai.models.manifest import read_manifest

    src = Path(__file__).resolve().parents[1] / "models"
    entry = next(e for e in read_manifest(src)[0] if e.key == ("soc", chemistry))
    shutil.copy(src / entry.file, Path(model_dir) / f"{entry.name}_v{version}.onnx")
    entry.version, entry.file = version, f"{entry.name}_v{version}.onnx"
    return entry


def realdata_dir() -> Path | None:
    """The shared real-vehicle data folder: $BMS_AI_REALDATA, or shared/realdata beside the checkout (None: absent)."""
    root = Path(__file__).resolve().parents[1]
    for base in (os.environ.get("BMS_AI_REALDATA"), root.parent / "shared" / "realdata",
                 root.parents[1] / "shared" / "realdata", Path("/work/shared/realdata")):
        if base and Path(base).is_dir():
            return Path(base)
    return None


def realdata(rel: str) -> Path:
    """A file of the shared real-vehicle data; the test is skipped, with the reason, when it is absent."""
    import pytest

    base = realdata_dir()
    if base is None or not (base / rel).is_file():
        pytest.skip(f"real vehicle data {rel} not found (shared/realdata beside the checkout, or $BMS_AI_REALDATA)")
    return base / rel
