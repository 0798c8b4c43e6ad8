"""Frame sources: any python-can bus by name, or a recorded log replayed in time.

One small interface (``frames(stop)``), implementations picked by name from
config, in the style of python-can's ``Bus``/``LogReader``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can

from bms_ai.can.offline import iter_log, read_log


class SourceError(RuntimeError):
    """The source failed (bus down, driver error, unreadable log); the caller reports and retries."""


class BusSource:
    """A python-can bus: socketcan, pcan, kvaser, vector, virtual, udp_multicast, ..."""

    kind = "bus"

    def __init__(self, interface: str, channel: str | int, poll: float = 0.05, **kwargs: Any) -> None:
        self.interface, self.channel, self.poll, self.kwargs = interface, channel, poll, kwargs
        self.description = f"{interface}:{channel}"
        self._bus: can.BusABC | None = None

    def open(self) -> can.BusABC:
        if self._bus is None:
            try:
                self._bus = can.Bus(interface=self.interface, channel=self.channel, **self.kwargs)
            except Exception as exc:  # drivers raise CanError, OSError, ImportError, ValueError...
                raise SourceError(f"cannot open CAN bus {self.description}: {type(exc).__name__}: {exc}") from exc
        return self._bus

    def frames(self, stop: threading.Event) -> Iterator[can.Message | None]:
        """Yields frames, and None on each idle poll so callers can run watchdogs."""
        bus = self.open()
        while not stop.is_set():
            try:
                msg = bus.recv(timeout=self.poll)
            except Exception as exc:
                self.close()
                raise SourceError(f"CAN bus {self.description} failed: {type(exc).__name__}: {exc}") from exc
            yield msg

    def close(self) -> None:
        if self._bus is not None:
            try:
                self._bus.shutdown()
            finally:
                self._bus = None


class LogReplaySource:
    """A recorded log at real time, x ``speed``, or as fast as possible (speed <= 0 or inf).

    Frames keep their log timestamps (CAN time = log time), so replays are
    deterministic. With ``loop`` the log repeats with timestamps shifted
    forward so time never runs backwards.
    """

    kind = "log"

    def __init__(self, path: str | Path, speed: float = 1.0, loop: bool = False, lightweight: bool = False) -> None:
        self.path = Path(path)
        # lightweight: yield slot objects read through the fast array reader instead of can.Message
        # (about 10x less CPU per frame; for consumers that never hand frames to python-can)
        self.lightweight = lightweight
        if not self.path.is_file():
            raise SourceError(f"CAN log not found: {self.path}")
        self.speed = speed if speed and speed > 0 and math.isfinite(speed) else math.inf
        self.loop = loop
        self.description = f"log:{self.path.name}"
        self.errors: list[str] = []
        self.finished = False

    def frames(self, stop: threading.Event) -> Iterator[can.Message | None]:
        offset = 0.0
        wall0 = time.monotonic()
        log0: float | None = None
        while not stop.is_set():
            last = first = None
            for msg in self._messages():
                if stop.is_set():
                    return
                if first is None:
                    first = msg.timestamp
                msg.timestamp += offset
                if log0 is None:
                    log0 = msg.timestamp
                if self.speed != math.inf:
                    target = wall0 + (msg.timestamp - log0) / self.speed
                    # sleep only when a frame is >= 5 ms ahead: frames due together go out in one
                    # wake-up (a bus driver also delivers bursts), saving a timed wait per frame
                    while (delay := target - time.monotonic()) > 0.005:
                        if stop.wait(min(delay, 0.05)):
                            return
                        yield None
                last = msg.timestamp
                yield msg
            if not self.loop or last is None:
                break
            offset = last + 0.01 - first  # the next pass starts 10 ms after this one ended
        self.finished = True
        while not stop.is_set():  # stay alive (silent bus) until stopped
            if stop.wait(0.05):
                return
            yield None

    def _messages(self):
        if self.lightweight and self.path.suffix.lower() == ".blf":
            frames = read_log(self.path)
            if frames.error:
                self.errors.append(frames.error)
            ts, ids, ext, dlc, bad = (frames.ts.tolist(), frames.ids.tolist(), frames.ext.tolist(),
                                      frames.dlc.tolist(), frames.bad.tolist())
            data = frames.data
            for i in range(len(ts)):
                yield Frame(ts[i], ids[i], data[i, :dlc[i]].tobytes(), ext[i], bad[i])
            return
        yield from iter_log(self.path, self.errors)

    def close(self) -> None:
        pass


class Frame:
    """The fields of a received frame that the pack decoder reads (a light can.Message)."""

    __slots__ = ("timestamp", "arbitration_id", "data", "is_extended_id", "is_error_frame", "is_remote_frame")

    def __init__(self, timestamp: float, arbitration_id: int, data: bytes, is_extended_id: bool,
                 bad: bool = False) -> None:
        self.timestamp = timestamp
        self.arbitration_id = arbitration_id
        self.data = data
        self.is_extended_id = is_extended_id
        self.is_error_frame = bad  # error, remote and oversize frames are all rejected alike
        self.is_remote_frame = False


SOURCES = {"bus": BusSource, "log": LogReplaySource}


def make_source(kind: str, **kwargs: Any):
    try:
        cls = SOURCES[kind]
    except KeyError:
        raise SourceError(f"unknown source kind '{kind}'; known: {sorted(SOURCES)}") from None
    return cls(**kwargs)
