"""UDS / ISO-TP polling of values a pack gives only on request (OVMS-style), for the bridge and offline.

Some packs broadcast only pack-level values; their cells come from the BMS
as answers to diagnostic requests (Hyundai/Kia ``22 01 02`` on 0x7E4 ->
0x7EC, Nissan Leaf ``21 02`` on 0x79B -> 0x7BB). The ``poll:`` section of the
pack config names the requests and where each value sits in an answer;
this module turns answers into values (:class:`PollStore`, shared with the
offline log path in :mod:`bms_ai.can.isotp_offline`) and sends the requests
on a live bus (:class:`UdsPoller`, ISO-TP by the ``can-isotp`` package).

The poller never reads the bus itself: whoever reads it (the bridge's read
loop, or a ``can.Notifier``) hands every frame to :meth:`UdsPoller.on_message`,
so the broadcast decode keeps every frame and is never blocked by a poll.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bms_ai.can.packconfig import POLL_ARRAYS, PollConfig, PollRequest, PollValue
from bms_ai.pack import PackSample

#: negative response code "request correctly received, response pending": the ECU asks for more time
NRC_PENDING = 0x78
#: frames held per ECU between two polls (a 4 KiB answer is 586 frames); older ones are dropped and counted
RX_QUEUE_FRAMES = 1024


def nrc_name(code: int) -> str:
    """The ISO 14229 name of a negative response code (udsoncan's table), hex when it has none."""
    from udsoncan import Response

    name = Response.Code.get_name(code)
    return name if name and not name.startswith("<") else f"0x{code:02x}"


def _raw(data: bytes, v: PollValue) -> np.ndarray:
    """The integers of ``v`` in ``data`` (``data`` long enough)."""
    chunk = data[v.start:v.end]
    if v.size in (1, 2, 4, 8):
        dt = np.dtype(f"{'>' if v.byteorder == 'big' else '<'}{'i' if v.signed else 'u'}{v.size}")
        return np.frombuffer(chunk, dtype=dt).astype(np.float64)
    return np.array([int.from_bytes(chunk[i:i + v.size], v.byteorder, signed=v.signed)
                     for i in range(0, len(chunk), v.size)], dtype=np.float64)


def decode_values(req: PollRequest, data: bytes) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """Values of a positive answer's data (the bytes after the service echo and identifier).

    Returns (values, None), or (None, reason) when the data is too short for
    the layout: a counted rejection, never an IndexError.
    """
    out: dict[str, np.ndarray] = {}
    for v in req.values:
        if v.end > len(data):
            return None, "short"
        x = _raw(data, v) * v.scale + v.offset
        if v.valid is not None:
            x[(x < v.valid[0]) | (x > v.valid[1])] = np.nan
        out[v.name] = x
    return out, None


def match_request(requests: list[PollRequest], payload: bytes, pending: PollRequest | None) -> PollRequest | None:
    """The request an answer belongs to: by its echoed service and identifier, else the one in flight.

    A negative answer echoes only the service, so it belongs to the request
    in flight; None: the answer is to nobody's request we know (ignored).
    """
    if payload[:1] == b"\x7f":
        return pending if pending is not None and payload[1:2] == bytes([pending.service]) else None
    for r in requests:
        if payload[:len(r.header)] == r.header:
            return r
    return pending


@dataclass
class PollStats:
    """Counts a diagnostics page shows: answers and timeouts per request, rejections per reason."""

    sent: collections.Counter = field(default_factory=collections.Counter)
    answers: collections.Counter = field(default_factory=collections.Counter)
    timeouts: collections.Counter = field(default_factory=collections.Counter)
    rejected: collections.Counter = field(default_factory=collections.Counter)  # reason -> n (bounded set)
    pending: int = 0  # "response pending" answers (the ECU asked for more time)
    ignored: int = 0  # answers on a polled id to requests that are not ours (a scanner on the same bus)
    last_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers and strings, for diagnostics key-values or a JSON report."""
        return {"sent": dict(self.sent), "answers": dict(self.answers), "timeouts": dict(self.timeouts),
                "rejected": dict(self.rejected), "pending": self.pending, "ignored": self.ignored,
                "last_error": self.last_error}


class PollStore:
    """The latest polled values with the CAN time of their answers; fixed size whatever runs.

    Pack arrays (``cell_voltages``, ``cell_temperatures``) are kept element by
    element, so several requests fill one vector; every other value is kept
    by name. Live polling and log decoding feed the same store through
    :meth:`answer`, so both give the same values for the same traffic.
    """

    def __init__(self, poll: PollConfig, n_cells: int = 0, n_temps: int = 0) -> None:
        self.poll = poll
        sizes = {"cell_voltages": n_cells, "cell_temperatures": n_temps}
        self.arrays = {k: (np.full(n, np.nan), np.full(n, np.nan)) for k, n in sizes.items()}
        self.values: dict[str, tuple[float | np.ndarray, float]] = {}
        self.stats = PollStats()
        self._lock = threading.Lock()

    def reject(self, reason: str, detail: str) -> None:
        """Count an answer that gave no values (reason from a bounded set) and keep its detail."""
        with self._lock:
            self.stats.rejected[reason] += 1
            self.stats.last_error = detail

    def answer(self, req: PollRequest, payload: bytes, stamp: float) -> bool | None:
        """Take one reassembled answer to ``req``: True values stored, False rejected, None pending."""
        if len(payload) >= 3 and payload[0] == 0x7F and payload[1] == req.service:
            if payload[2] == NRC_PENDING:
                with self._lock:
                    self.stats.pending += 1
                return None
            name = nrc_name(payload[2])
            self.reject(f"negative:{name}", f"{req.name}: negative response {name}")
            return False
        head = req.header
        if payload[:len(head)] != head:
            reason = "malformed" if len(payload) < len(head) or payload[0] == 0x7F else "wrong_answer"
            self.reject(reason, f"{req.name}: answer starts {payload[:len(head)].hex()}, expected {head.hex()}")
            return False
        values, reason = decode_values(req, bytes(payload[len(head):]))
        if values is None:
            self.reject(reason or "short", f"{req.name}: {len(payload) - len(head)} data bytes, layout needs "
                                           f"{max(v.end for v in req.values)}")
            return False
        self._store(req, values, stamp)
        return True

    def _store(self, req: PollRequest, values: dict[str, np.ndarray], stamp: float) -> None:
        with self._lock:
            self.stats.answers[req.name] += 1
            for v in req.values:
                x = values[v.name]
                if v.name in POLL_ARRAYS:
                    vals, stamps = self.arrays[v.name]
                    first = v.index or 0
                    vals[first:first + v.count] = x
                    stamps[first:first + v.count] = stamp
                else:
                    self.values[v.name] = (float(x[0]) if v.count == 1 else x.copy(), stamp)

    def latest(self) -> dict[str, tuple[float | np.ndarray, float]]:
        """Name -> (value, CAN time of its answer); pack arrays as (values, stamps) copies. Safe from any thread."""
        with self._lock:
            out: dict[str, tuple[Any, Any]] = {k: (v[0] if np.isscalar(v[0]) else v[0].copy(), v[1])
                                               for k, v in self.values.items()}
            for k, (vals, stamps) in self.arrays.items():
                if len(vals):
                    out[k] = (vals.copy(), stamps.copy())
        return out

    def apply(self, sample: PackSample) -> None:
        """Polled values into a sample: pack arrays where an answer is newer, other values as status."""
        with self._lock:
            for key, stamp_key in (("cell_voltages", "cell_voltage_stamps"),
                                   ("cell_temperatures", "cell_temperature_stamps")):
                vals, stamps = self.arrays[key]
                dst, dst_stamps = getattr(sample, key), getattr(sample, stamp_key)
                if not len(vals) or dst.shape != vals.shape:
                    continue
                newer = np.isfinite(stamps) & ~(dst_stamps >= stamps)
                dst[newer] = vals[newer]
                dst_stamps[newer] = stamps[newer]
            for name, (v, _) in self.values.items():
                if np.isscalar(v):
                    sample.status[name] = float(v)
                else:
                    sample.status.update({f"{name}_{i}": float(x) for i, x in enumerate(v)})


class _Ecu:
    """One request/response id pair: its ISO-TP layer, the frames waiting for it and the request in flight."""

    def __init__(self, key: tuple[int, int, bool], requests: list[PollRequest], t0: float) -> None:
        self.key = key
        self.requests = requests
        self.due = {r.name: t0 for r in requests}
        self.rx: collections.deque = collections.deque(maxlen=RX_QUEUE_FRAMES)
        self.outstanding: PollRequest | None = None
        self.deadline = 0.0
        self.next_allowed = t0
        self.last_rx_stamp = float("nan")
        self.tl: Any = None  # isotp.TransportLayerLogic once started

    def next_request(self, now: float) -> PollRequest | None:
        """The most overdue request, if any is due."""
        r = min(self.requests, key=lambda r: self.due[r.name])
        return r if self.due[r.name] <= now else None


class UdsPoller:
    """Sends the configured requests on a live bus, rate-limited, and decodes the answers into a :class:`PollStore`.

    At most one request per ECU (request/response id pair) is in flight, and
    ``poll.min_gap`` seconds pass between the end of one exchange with an ECU
    and the next request to it. A request unanswered after its ``timeout`` is
    counted and the ECU freed. Nothing here blocks: :meth:`poll_once` does one
    non-blocking pass (the bridge may call it from a timer), or :meth:`start`
    runs it on a thread of its own.
    """

    def __init__(self, poll: PollConfig, n_cells: int = 0, n_temps: int = 0, *, bus_name: str | None = None,
                 clock: Callable[[], float] = time.monotonic, tick: float = 0.005) -> None:
        self.poll = poll
        self.store = PollStore(poll, n_cells, n_temps)
        self.clock = clock
        self.tick = tick
        mine = [r for r in poll.requests if r.bus is None or r.bus == bus_name]
        groups: dict[tuple[int, int, bool], list[PollRequest]] = {}
        for r in mine:
            groups.setdefault((r.request_id, r.response_id, r.extended), []).append(r)
        t0 = clock()
        self.ecus = [_Ecu(k, v, t0) for k, v in groups.items()]
        self._by_rx = {(e.key[1], e.key[2]): e for e in self.ecus}
        self.bus: Any = None
        self._notifier: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # poll_once from a thread and a caller at once

    @property
    def stats(self) -> PollStats:
        """Counters of requests, answers, timeouts and rejections."""
        return self.store.stats

    def latest(self) -> dict[str, tuple[float | np.ndarray, float]]:
        """The latest values by name with the CAN time of their answers (see :meth:`PollStore.latest`)."""
        return self.store.latest()

    def apply(self, sample: PackSample) -> None:
        """Polled values into a sample before it is published (see :meth:`PollStore.apply`)."""
        self.store.apply(sample)

    # ------------------------------------------------------------------ live bus

    def start(self, bus: Any, notifier: Any = None, thread: bool = True) -> UdsPoller:
        """Poll on ``bus``; frames come from ``notifier`` (a ``can.Notifier``) or the caller's :meth:`on_message`.

        ``thread``: run :meth:`poll_once` every ``tick`` s on a daemon thread;
        without it the caller calls :meth:`poll_once` itself.
        """
        import isotp

        self.bus = bus
        for e in self.ecus:
            req_id, rsp_id, ext = e.key
            mode = isotp.AddressingMode.Normal_29bits if ext else isotp.AddressingMode.Normal_11bits
            pad = next((r.padding for r in e.requests if r.padding is not None), None)
            e.tl = isotp.TransportLayerLogic(
                rxfn=self._rx_fn(e), txfn=self._send, address=isotp.Address(mode, txid=req_id, rxid=rsp_id),
                error_handler=self._isotp_error, params={"tx_padding": pad, "blocking_send": False})
        if notifier is not None:
            notifier.add_listener(self.on_message)
            self._notifier = notifier
        if thread:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="uds-poller", daemon=True)
            self._thread.start()
        return self

    def use_bus(self, bus: Any) -> None:
        """Send on ``bus`` from now on (the reader reopened it after a driver error); the state is kept."""
        self.bus = bus

    def stop(self) -> None:
        """Stop the thread and detach from the notifier (the bus stays open: it is the caller's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._notifier is not None:
            with contextlib.suppress(ValueError):  # already removed
                self._notifier.remove_listener(self.on_message)
            self._notifier = None

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.poll_once()
            except Exception as exc:  # a driver error must not end polling silently
                self.store.reject("error", f"{type(exc).__name__}: {exc}")

    def on_message(self, msg: Any) -> None:
        """A received frame (any id; those of no polled ECU cost one dict lookup). Thread-safe, never blocks."""
        e = self._by_rx.get((msg.arbitration_id, bool(msg.is_extended_id)))
        if e is None or msg.is_error_frame or msg.is_remote_frame:
            return
        if len(e.rx) == RX_QUEUE_FRAMES:
            self.store.reject("rx_overflow", f"{e.key[1]:#x}: more than {RX_QUEUE_FRAMES} frames between polls")
        e.rx.append(msg)

    def __call__(self, msg: Any) -> None:
        """A ``can.Listener``-style callable."""
        self.on_message(msg)

    def _rx_fn(self, e: _Ecu) -> Callable[[float], Any]:
        import isotp

        def rx(_timeout: float) -> Any:
            try:
                m = e.rx.popleft()
            except IndexError:
                return None
            e.last_rx_stamp = float(m.timestamp)
            return isotp.CanMessage(arbitration_id=m.arbitration_id, data=bytes(m.data),
                                    extended_id=bool(m.is_extended_id))
        return rx

    def _send(self, m: Any) -> None:
        import can

        try:
            self.bus.send(can.Message(arbitration_id=m.arbitration_id, data=m.data, is_extended_id=m.is_extended_id))
        except can.CanError as exc:
            self.store.reject("send_failed", f"{m.arbitration_id:#x}: {exc}")

    def _isotp_error(self, exc: Exception) -> None:
        self.store.reject(f"isotp:{type(exc).__name__}", str(exc))

    def poll_once(self, now: float | None = None) -> int:
        """One non-blocking pass: take answers, expire requests past their timeout, send what is due.

        Returns the number of requests sent. ``now``: the clock's time (tests
        pass their own).
        """
        if self.bus is None:
            raise RuntimeError("UdsPoller.poll_once before start(bus)")
        now = self.clock() if now is None else now
        sent = 0
        with self._lock:
            for e in self.ecus:
                e.tl.process()
                self._collect(e, now)
                if e.outstanding is not None and now > e.deadline:
                    self.store.stats.timeouts[e.outstanding.name] += 1
                    self.store.stats.last_error = f"{e.outstanding.name}: no answer within {e.outstanding.timeout:g} s"
                    self._finish(e, now)
                    e.tl.reset()
                if e.outstanding is None and now >= e.next_allowed and (r := e.next_request(now)) is not None:
                    e.tl.send(r.payload)
                    e.tl.process(do_rx=False)
                    e.outstanding, e.deadline = r, now + r.timeout
                    e.due[r.name] = now + r.period
                    self.store.stats.sent[r.name] += 1
                    sent += 1
        return sent

    def _collect(self, e: _Ecu, now: float) -> None:
        while (payload := e.tl.recv()) is not None:
            req = match_request(e.requests, bytes(payload), e.outstanding)
            if req is None:
                self.store.stats.ignored += 1
                continue
            result = self.store.answer(req, bytes(payload), e.last_rx_stamp)
            if req is not e.outstanding:  # a late answer to an earlier request: its values still count
                continue
            if result is None:  # response pending: the ECU asked for more time
                e.deadline = now + req.timeout
            else:
                self._finish(e, now)

    def _finish(self, e: _Ecu, now: float) -> None:
        e.outstanding = None
        e.next_allowed = now + self.poll.min_gap
