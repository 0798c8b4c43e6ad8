"""Frame sources: any python-can bus by name, or a recorded log replayed in time.

One small interface (:class:`FrameSource`), implementations picked by name
from :data:`SOURCES`, in the style of python-can's ``Bus``/``LogReader``.
Callers open one with :func:`open_source` and ask the source, never its
type, how to treat it (replay or live bus, speed, finished).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import can
import numpy as np

from bms_ai.can.frames import FrameArrays, stamp_ok, stamps_ok
from bms_ai.can.logs import CHUNK_ROWS, iter_log, log_format, read_log_chunks
from bms_ai.core.registry import Registry


class SourceError(RuntimeError):
    """The source failed (bus down, driver error, unreadable log); the caller reports and retries."""


@dataclass(frozen=True)
class SourceOptions:
    """Everything a source may be configured with (the bridge's parameters); each source reads its own."""

    log: str | Path = ""
    interface: str = "virtual"
    channel: str | int = "vcan0"
    bus_options: str | dict | None = None  # extra python-can Bus kwargs, a dict or a JSON object
    speed: float = 1.0  # log replay: x real time; <= 0 or inf = as fast as possible
    loop: bool = False
    # the consumer never hands frames to python-can and keeps their log timestamps,
    # so a replay may skip building can.Message objects
    lightweight: bool = False


class FrameSource:
    """A stream of received CAN frames with the few facts a consumer needs about it."""

    description = ""
    #: a recorded log rather than a live bus: it can wait for its readers and be published losslessly
    replay = False
    #: CAN seconds per wall-clock second (math.inf: as fast as the consumer takes the frames)
    speed = 1.0

    def __init__(self) -> None:
        self.errors: list[str] = []  # read problems that did not stop the source (damaged log tail)
        self.finished = False  # every frame has been delivered (a live bus never finishes)

    @property
    def replaying(self) -> bool:
        """Frames are still coming from a log: a pause is the reader catching up, not a silent bus."""
        return self.replay and not self.finished

    @classmethod
    def from_options(cls, options: SourceOptions) -> FrameSource:
        """The source as configured by ``options`` (what :func:`open_source` calls)."""
        raise NotImplementedError

    def frames(self, stop: threading.Event) -> Iterator[can.Message | None]:
        """Frames until ``stop`` is set; None on idle polls so the caller can run its watchdogs."""
        raise NotImplementedError

    def bursts(self, stop: threading.Event) -> Iterator[list | None]:
        """:meth:`frames` in lists of frames received together (in order), None on idle polls.

        A consumer then pays its fixed costs (a lock, a clock read) once per
        burst instead of once per frame; a source without bursts gives lists of one.
        """
        for msg in self.frames(stop):
            yield None if msg is None else [msg]

    def frame_chunks(self) -> Iterator[FrameArrays] | None:
        """The source as arrays, chunk by chunk, when it may be decoded vectorised (a finite log at
        maximum speed), else None. Damage ends the chunks with its reason in :attr:`errors`.
        """
        return None

    def paced_chunks(self, stop: threading.Event) -> Iterator[tuple[FrameArrays, np.ndarray]] | None:
        """The source as arrays with the steady-clock time each frame is due, when it may be decoded
        vectorised and paced by its consumer (a log of light frames in real time), else None.
        """
        return None

    def close(self) -> None:
        """Release the driver or file; the source may be opened again by iterating :meth:`frames`."""


class BusSource(FrameSource):
    """A python-can bus: socketcan, pcan, kvaser, vector, virtual, udp_multicast, ..."""

    def __init__(self, interface: str, channel: str | int, poll: float = 0.05, **kwargs: Any) -> None:
        super().__init__()
        if interface not in can.VALID_INTERFACES:  # a typo is a configuration error, not a bus to retry
            raise SourceError(f"unknown CAN interface {interface!r}; python-can has: "
                              f"{', '.join(sorted(can.VALID_INTERFACES))}")
        self.interface, self.channel, self.poll, self.kwargs = interface, channel, poll, kwargs
        self.description = f"{interface}:{channel}"
        self._bus: can.BusABC | None = None

    @classmethod
    def from_options(cls, options: SourceOptions) -> BusSource:
        """The bus named by ``interface``/``channel`` with the extra ``bus_options``."""
        return cls(options.interface, options.channel, **bus_options(options.bus_options))

    @property
    def bus(self) -> can.BusABC | None:
        """The open bus (None before :meth:`frames` opens it or after :meth:`close`): a poller sends on it."""
        return self._bus

    def open(self) -> can.BusABC:
        """The python-can bus, opened on first use; SourceError with the driver's reason on failure."""
        if self._bus is None:
            try:
                self._bus = can.Bus(interface=self.interface, channel=self.channel, **self.kwargs)
            except Exception as exc:  # drivers raise CanError, OSError, ImportError, ValueError...
                raise SourceError(f"cannot open CAN bus {self.description}: {type(exc).__name__}: {exc}") from exc
        return self._bus

    def frames(self, stop: threading.Event) -> Iterator[can.Message | None]:
        """Received frames, and None on each idle poll."""
        bus = self.open()
        while not stop.is_set():
            try:
                msg = bus.recv(timeout=self.poll)
            except Exception as exc:
                self.close()
                raise SourceError(f"CAN bus {self.description} failed: {type(exc).__name__}: {exc}") from exc
            yield msg

    def close(self) -> None:
        """Shut the bus down (it reopens on the next :meth:`frames`)."""
        if self._bus is not None:
            try:
                self._bus.shutdown()
            finally:
                self._bus = None


#: a pause in a log longer than this (CAN seconds) is replayed as this long: a recording break
#: (or a damaged stamp far ahead) must not stall a real-time replay for hours
MAX_REPLAY_GAP = 60.0


class ReplayClock:
    """When each frame of a log is due on the steady clock at ``speed``.

    Damaged stamps are due at once; a pause longer than ``max_gap`` is
    shortened to ``max_gap`` (counted in :attr:`gaps`), so every wait is bounded.
    """

    def __init__(self, speed: float, max_gap: float = MAX_REPLAY_GAP) -> None:
        self.speed, self.max_gap = speed, max_gap
        self.gaps = 0
        self._wall0 = self._log0 = self._last = math.nan

    def due(self, ts: float, now: float) -> float:
        """Steady-clock time at which the frame stamped ``ts`` goes out (``now`` at maximum speed)."""
        if self.speed == math.inf or not stamp_ok(ts):
            return now
        if math.isnan(self._wall0):
            self._wall0, self._log0, self._last = now, ts, ts
        elif ts - self._last > self.max_gap:
            self.gaps += 1
            self._wall0 += (self._last + self.max_gap - self._log0) / self.speed
            self._log0 = ts
        self._last = max(self._last, ts)
        return self._wall0 + (ts - self._log0) / self.speed

    def dues(self, ts: np.ndarray, now: float) -> np.ndarray:
        """:meth:`due` of each stamp in order, as one array (a chunk of a log at a few numpy calls per break)."""
        out = np.full(len(ts), now, dtype=float)
        if self.speed == math.inf:
            return out
        good = np.flatnonzero(stamps_ok(ts))
        i = 0
        while i < len(good):
            if math.isnan(self._wall0):  # the first stamp sets the clock
                out[good[i]] = self.due(float(ts[good[i]]), now)
                i += 1
                continue
            seg = ts[good[i:]]
            before = np.maximum.accumulate(np.concatenate(([self._last], seg)))  # the latest stamp up to each
            breaks = np.flatnonzero(seg - before[:-1] > self.max_gap)
            k = int(breaks[0]) if len(breaks) else len(seg)
            out[good[i:i + k]] = self._wall0 + (seg[:k] - self._log0) / self.speed
            self._last = float(before[k])
            if k < len(seg):  # a stamp after a break: due() shortens the break
                out[good[i + k]] = self.due(float(seg[k]), now)
            i += k + 1
        return out


#: a replay waits only for frames due this far ahead; the ones due sooner go out in the same burst
REPLAY_BURST_S = 0.05
#: frames in one burst at most (a replay at maximum speed is otherwise one burst)
MAX_BURST = 256
#: frames per chunk of a light real-time replay (~6 s at nominal traffic): the consumer's state (counts,
#: receive times) moves a chunk at a time, and each chunk's vectorised decode costs a few ms however small
PACED_ROWS = 8192
#: frames in a pass's first chunk (~0.2 s at nominal traffic): until it is taken over, the consumer has
#: counted no frame and would report every message as timed out while frames are already due
PACED_FIRST_ROWS = 256
#: a burst's first frame goes out when due to within this (a shorter wait costs more than it is late)
DUE_SLACK = 0.001


def _wait_until(target: float, stop: threading.Event, slack: float) -> Generator[None, None, bool]:
    """None polls until ``target`` (steady clock) is less than ``slack`` ahead; True when stopped meanwhile.

    Waits only when more than ``slack`` ahead: frames due together go out in
    one wake-up (a bus driver also delivers bursts). A timed wake-up costs
    ~0.1 ms of CPU on a vehicle computer's VM, so at 1.4k frames/s this is 20
    wake-ups a second instead of 200 (~2 % of a core less; samples are on CAN
    time, so nothing the graph computes changes).
    """
    while (delay := target - time.monotonic()) > slack:
        if stop.wait(min(delay, 0.05)):
            return True
        yield None
    return False


def _cut_first(chunks: Iterator[FrameArrays], n: int) -> Iterator[FrameArrays]:
    """``chunks`` with the first one cut after ``n`` frames."""
    for k, chunk in enumerate(chunks):
        if k == 0 and len(chunk) > n:
            yield from chunk.split(n)
        else:
            yield chunk


class LogReplaySource(FrameSource):
    """A recorded log at real time, x ``speed``, or as fast as possible (speed <= 0 or inf).

    Frames keep their log timestamps (CAN time = log time), so replays are
    deterministic. With ``loop`` the log repeats with timestamps shifted
    forward so time never runs backwards.
    """

    replay = True

    def __init__(self, path: str | Path, speed: float = 1.0, loop: bool = False, lightweight: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        # lightweight: yield Frame objects read through the format's array reader instead of can.Message
        # (about 10x less CPU per frame; for consumers that never hand frames to python-can)
        self.lightweight = lightweight
        if not self.path.is_file():
            raise SourceError(f"CAN log not found: {self.path}")
        self.speed = speed if speed and speed > 0 and math.isfinite(speed) else math.inf
        self.loop = loop
        self.description = f"log:{self.path.name}"
        self.gaps_shortened = 0  # pauses longer than MAX_REPLAY_GAP replayed shortened

    @classmethod
    def from_options(cls, options: SourceOptions) -> LogReplaySource:
        """A replay of ``log`` at ``speed``."""
        return cls(options.log, speed=options.speed, loop=options.loop, lightweight=options.lightweight)

    def frames(self, stop: threading.Event) -> Iterator[can.Message | None]:
        """The log's frames paced by :attr:`speed`, then None polls (a silent bus) until stopped."""
        for burst in self.bursts(stop):
            if burst is None:
                yield None
                continue
            for msg in burst:
                if stop.is_set():
                    return
                yield msg

    def bursts(self, stop: threading.Event) -> Iterator[list | None]:
        """The frames due within REPLAY_BURST_S of now, one list per wake-up (at most MAX_BURST frames).

        No frame goes out more than REPLAY_BURST_S early (the pacing of a
        frame-by-frame replay), and the clock is read once per burst rather
        than once per frame.
        """
        if (yield from self._passes(stop, self._pass_bursts)):
            return
        while not stop.is_set():  # stay alive (silent bus) until stopped
            if stop.wait(0.05):
                return
            yield None

    def _passes(self, stop: threading.Event, one_pass) -> Generator[Any, None, bool]:
        """The log's passes (one, or repeated with ``loop``) through ``one_pass``; True when stopped.

        Each pass's stamps are shifted to start 10 ms after the previous pass
        ended, on one :class:`ReplayClock`; the source is finished after the last.
        """
        offset = 0.0
        clock = ReplayClock(self.speed)
        while not stop.is_set():
            span: list[float] = []  # the pass's first and last good stamp
            if (yield from one_pass(stop, clock, offset, span)):
                return True
            self.gaps_shortened = clock.gaps
            if len(self.errors) > 1 and self.errors[-1] == self.errors[-2]:
                self.errors.pop()  # a looped damaged log: the same damage once, not once per pass
            if not self.loop or not span:
                break
            offset += span[1] + 0.01 - span[0]  # the next pass starts 10 ms after this one ended
        self.finished = True
        return False

    def _pass_bursts(self, stop: threading.Event, clock: ReplayClock, offset: float,
                     span: list[float]) -> Generator[list | None, None, bool]:
        """One pass over the log in bursts, stamps shifted by ``offset``; True when stopped meanwhile."""
        if self.lightweight and log_format(self.path).fast_arrays:
            return (yield from self._pass_chunk_bursts(stop, clock, offset, span))
        burst: list = []
        now = time.monotonic()
        for msg in iter_log(self.path, self.errors):  # python-can messages (a light replay: below)
            if stop.is_set():
                return True
            ts = msg.timestamp
            if stamp_ok(ts):  # a damaged stamp is passed on (the consumer rejects it), never waited for
                if span:
                    span[1] = max(span[1], ts)
                else:
                    span += [ts, ts]
                msg.timestamp = ts + offset
            due = clock.due(msg.timestamp, now)
            if due - now > REPLAY_BURST_S or len(burst) >= MAX_BURST:
                if burst:
                    yield burst
                    burst = []
                # until this frame is due: the next burst then spans a whole REPLAY_BURST_S, however
                # long the consumer took over the last one
                if (yield from _wait_until(due, stop, DUE_SLACK)):
                    return True
                now = time.monotonic()
            burst.append(msg)
        if burst:
            yield burst
        return False

    def _pass_chunk_bursts(self, stop: threading.Event, clock: ReplayClock, offset: float,
                           span: list[float]) -> Generator[list | None, None, bool]:
        """:meth:`_pass_bursts` of light frames, paced per chunk of the log's arrays instead of per frame.

        The same bursts as frame by frame (the same waits and cuts), but the
        stamps' shift and due times are computed a chunk at a time: per frame
        that bookkeeping was a fifth of the graph's CPU at nominal traffic.
        """
        burst: list = []
        now = time.monotonic()
        for chunk, due in self._timed_chunks(clock, offset, span, CHUNK_ROWS):
            frames = chunk.frames()
            i, n = 0, len(chunk)
            while i < n:
                if stop.is_set():
                    return True
                if len(burst) >= MAX_BURST or due[i] - now > REPLAY_BURST_S:
                    if burst:
                        yield burst
                        burst = []
                    if (yield from _wait_until(float(due[i]), stop, DUE_SLACK)):
                        return True
                    now = time.monotonic()
                # frame i joins the burst, and the ones after it that are due by then, up to MAX_BURST
                later = np.flatnonzero(due[i + 1:i + MAX_BURST - len(burst)] - now > REPLAY_BURST_S)
                k = 1 + (int(later[0]) if len(later) else min(n - i - 1, MAX_BURST - len(burst) - 1))
                burst.extend(islice(frames, k))
                i += k
        if burst:
            yield burst
        return False

    def _timed_chunks(self, clock: ReplayClock, offset: float, span: list[float],
                      rows: int, first_rows: int | None = None) -> Iterator[tuple[FrameArrays, np.ndarray]]:
        """The log's chunks with stamps shifted by ``offset`` and each frame's due time on ``clock``.

        A damaged stamp is passed on (the consumer rejects it), never waited
        for: due at once (-inf). ``span`` gets the pass's first and latest good stamp.
        ``first_rows``: the pass's first chunk is cut after that many frames.
        """
        chunks = read_log_chunks(self.path, rows, errors=self.errors)
        if first_rows is not None:
            chunks = _cut_first(chunks, first_rows)
        for chunk in chunks:
            ts = chunk.ts.copy()
            ok = stamps_ok(ts)
            if ok.any():
                good = ts[ok]
                latest = float(good.max())
                if span:
                    span[1] = max(span[1], latest)
                else:
                    span += [float(good[0]), latest]
                ts[ok] += offset
            due = clock.dues(ts, time.monotonic())
            due[~ok] = -math.inf
            yield replace(chunk, ts=ts), due

    def paced_chunks(self, stop: threading.Event) -> Iterator[tuple[FrameArrays, np.ndarray]] | None:
        """Chunks of :data:`PACED_ROWS` frames (a pass's first :data:`PACED_FIRST_ROWS`) with their due times,
        for a light real-time replay.

        The consumer waits for the due times (and checks ``stop``); passes
        repeat with ``loop``, and the source is finished after the last chunk.
        """
        if self.speed == math.inf or not self.lightweight or not log_format(self.path).fast_arrays:
            return None

        def one_pass(_stop, clock, offset, span):
            yield from self._timed_chunks(clock, offset, span, PACED_ROWS, PACED_FIRST_ROWS)
            return False

        return self._passes(stop, one_pass)

    def frame_chunks(self) -> Iterator[FrameArrays] | None:
        """The log in chunks, when it plays once at maximum speed to a consumer of light frames."""
        if self.speed != math.inf or self.loop or not self.lightweight:
            return None
        return read_log_chunks(self.path, errors=self.errors)


SOURCES: Registry[type[FrameSource]] = Registry("CAN source")
SOURCES.add("bus", BusSource, "a python-can bus by interface name (socketcan, pcan, virtual, udp_multicast, ...)")
SOURCES.add("log", LogReplaySource, "a recorded log replayed in CAN time (any format in bms_ai.can.logs)")


def can_filters(ids: Iterable[tuple[int, bool]]) -> list[dict[str, Any]]:
    """python-can receive filters passing exactly ``ids`` ((arbitration id, extended) pairs), nothing else.

    On socketcan the kernel drops every other frame, so a busy shared
    vehicle bus costs Python only the frames the pack config uses; other
    interfaces filter in python-can (same result, less saving).
    """
    return [{"can_id": i, "can_mask": 0x1FFFFFFF if ext else 0x7FF, "extended": ext} for i, ext in sorted(set(ids))]


def bus_options(text: str | dict | None) -> dict[str, Any]:
    """Extra python-can ``Bus`` keyword arguments from a JSON object (ROS parameters are strings)."""
    if isinstance(text, dict):
        return dict(text)
    try:
        opts = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"bus_options is not JSON: {exc}") from exc
    if not isinstance(opts, dict):
        raise ValueError(f"bus_options must be a JSON object, got {type(opts).__name__}")
    return opts


def open_source(log: str | Path = "", *, kind: str | None = None, **options: Any) -> FrameSource:
    """The frame source a bridge or replayer is configured for.

    ``kind`` names an entry of :data:`SOURCES`; by default a set ``log``
    means a replay, else a bus. ``options`` are the fields of
    :class:`SourceOptions`; each source takes the ones it needs.
    """
    kind = kind or ("log" if log else "bus")
    return SOURCES.get(kind).from_options(SourceOptions(log=log, **options))
