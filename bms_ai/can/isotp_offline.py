"""ISO-TP messages rebuilt from recorded frames, and polled values decoded from a recorded drive.

A log holds every frame of a diagnostic exchange (request, first frame,
flow control, consecutive frames), so reassembly needs no timing and sends
nothing: flow control frames are recognised and skipped. The answers then
go through the same :class:`~bms_ai.can.uds.PollStore` as live polling, so
a drive recorded while polling yields the values the live poller had.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bms_ai.can.frames import FrameArrays
from bms_ai.can.packconfig import PollConfig, PollRequest
from bms_ai.can.uds import PollStore, decode_values, match_request

MAX_PAYLOAD = 4095  # classic CAN ISO-TP (the escape to 32-bit lengths is CAN FD only)
MAX_ANSWERS = 100_000  # answers :func:`decode_poll_log` keeps (a day of polling every second)


@dataclass
class IsoTpMessage:
    """One reassembled message: the CAN time of its last frame, its arbitration id and payload."""

    stamp: float
    arbitration_id: int
    payload: bytes


class Reassembler:
    """ISO-TP reception for one arbitration id from recorded frames (normal addressing, classic CAN).

    Damage (a consecutive frame out of sequence or without a first frame, a
    first frame interrupting another, impossible lengths) is counted per
    reason in :attr:`errors` and drops the message in progress; it never raises.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.expected = 0
        self.seq = 0
        self.errors: collections.Counter = collections.Counter()
        self.flow_control = 0

    def feed(self, data: bytes) -> bytes | None:
        """One frame's data; the whole payload when this frame completes a message."""
        if not data:
            self.errors["empty_frame"] += 1
            return None
        kind = data[0] >> 4
        if kind == 0:
            return self._single(data)
        if kind == 1:
            return self._first(data)
        if kind == 2:
            return self._consecutive(data)
        if kind == 3:
            self.flow_control += 1  # the other side's flow control; a log needs none
            return None
        self.errors["bad_pci"] += 1
        return None

    def _interrupt(self) -> None:
        if self.expected:
            self.errors["interrupted"] += 1
        self.expected = 0
        self.buf.clear()

    def _single(self, data: bytes) -> bytes | None:
        self._interrupt()
        n = data[0] & 0x0F
        if n == 0 or n > len(data) - 1:
            self.errors["bad_length"] += 1
            return None
        return bytes(data[1:1 + n])

    def _first(self, data: bytes) -> bytes | None:
        self._interrupt()
        n = ((data[0] & 0x0F) << 8) | (data[1] if len(data) > 1 else 0)
        if len(data) < 8 or n < 8 or n > MAX_PAYLOAD:
            self.errors["bad_length"] += 1
            return None
        self.buf[:] = data[2:8]
        self.expected, self.seq = n, 1
        return None

    def _consecutive(self, data: bytes) -> bytes | None:
        if not self.expected:
            self.errors["unexpected_consecutive"] += 1
            return None
        if data[0] & 0x0F != self.seq:
            self.errors["wrong_sequence"] += 1
            self.expected = 0
            self.buf.clear()
            return None
        self.seq = (self.seq + 1) & 0x0F
        self.buf += data[1:1 + self.expected - len(self.buf)]
        if len(self.buf) < self.expected:
            return None
        out, self.expected = bytes(self.buf), 0
        self.buf.clear()
        return out


def _rows(frames: Any, ids: set[int]) -> Iterator[tuple[float, int, bool, bytes]]:
    """(time, id, extended, data) of the frames on ``ids``: FrameArrays filtered vectorised, or any messages."""
    if isinstance(frames, FrameArrays):
        keep = np.flatnonzero(np.isin(frames.ids, np.fromiter(ids, dtype=np.uint32, count=len(ids))) & ~frames.bad)
        ts, fid, ext, dlc = (frames.ts[keep].tolist(), frames.ids[keep].tolist(), frames.ext[keep].tolist(),
                             frames.dlc[keep].tolist())
        for j, i in enumerate(keep.tolist()):
            yield ts[j], fid[j], ext[j], frames.data[i, :dlc[j]].tobytes()
        return
    for m in frames:
        if m.arbitration_id in ids and not (m.is_error_frame or m.is_remote_frame):
            yield float(m.timestamp), int(m.arbitration_id), bool(m.is_extended_id), bytes(m.data)


def isotp_messages(frames: Any, ids: Iterable[int], errors: collections.Counter | None = None,
                   extended: bool | None = None) -> Iterator[IsoTpMessage]:
    """Reassembled messages on ``ids`` from FrameArrays, python-can messages or :class:`Frame` rows, in order.

    ``extended``: only 11-bit (False) or 29-bit (True) frames; None both.
    Reassembly damage is added to ``errors`` per reason.
    """
    ids = set(ids)
    asm: dict[tuple[int, bool], Reassembler] = {}
    try:
        for ts, fid, ext, data in _rows(frames, ids):
            if extended is not None and ext != extended:
                continue
            r = asm.setdefault((fid, ext), Reassembler())
            payload = r.feed(data)
            if payload is not None:
                yield IsoTpMessage(ts, fid, payload)
    finally:
        if errors is not None:
            for r in asm.values():
                errors.update(r.errors)


@dataclass
class PolledAnswer:
    """One answer found in a log: which request, its CAN time, and whether it gave values."""

    request: str
    stamp: float
    ok: bool | None  # True values, False rejected, None "response pending"
    values: dict[str, Any] = field(default_factory=dict)


class PollLogDecoder:
    """Answers to the configured requests found in recorded frames, chunk by chunk or frame by frame.

    Keeps the reassembly state between calls, so a replay can feed it each
    frame (:meth:`on_message`) or each chunk of arrays (:meth:`feed`) and get
    the values the live poller had. The requests in the log tell which
    request a negative answer belongs to; answers on a polled id to requests
    that are not configured (a scanner on the same bus) are counted as ignored.
    """

    def __init__(self, poll: PollConfig, n_cells: int = 0, n_temps: int = 0, store: PollStore | None = None,
                 max_answers: int = MAX_ANSWERS) -> None:
        self.store = store or PollStore(poll, n_cells, n_temps)
        self.by_rx: dict[int, list[PollRequest]] = collections.defaultdict(list)
        self.by_tx: dict[int, list[PollRequest]] = collections.defaultdict(list)
        for r in poll.requests:
            self.by_rx[r.response_id].append(r)
            self.by_tx[r.request_id].append(r)
        self.ids = set(self.by_rx) | set(self.by_tx)
        self.pending: dict[int, PollRequest | None] = {}  # response id -> request last seen for it
        self.answers: collections.deque[PolledAnswer] = collections.deque(maxlen=max_answers)
        self._asm: dict[tuple[int, bool], Reassembler] = {}
        self._damage_reported: collections.Counter = collections.Counter()

    def feed(self, frames: Any) -> None:
        """FrameArrays (filtered vectorised) or an iterable of python-can messages / :class:`Frame` rows."""
        for ts, fid, ext, data in _rows(frames, self.ids):
            self._frame(ts, fid, ext, data)
        self._report_damage()

    def on_message(self, msg: Any) -> None:
        """One received frame (a ``can.Listener``-style hook for a replay loop); other ids cost a set lookup."""
        if msg.arbitration_id in self.ids and not (msg.is_error_frame or msg.is_remote_frame):
            self._frame(float(msg.timestamp), int(msg.arbitration_id), bool(msg.is_extended_id), bytes(msg.data))
            self._report_damage()

    def _frame(self, ts: float, fid: int, ext: bool, data: bytes) -> None:
        payload = self._asm.setdefault((fid, ext), Reassembler()).feed(data)
        if payload is not None:
            self._message(IsoTpMessage(ts, fid, payload))

    def _message(self, m: IsoTpMessage) -> None:
        store = self.store
        if m.arbitration_id in self.by_tx:
            sent = next((r for r in self.by_tx[m.arbitration_id] if m.payload == r.payload), None)
            for r in self.by_tx[m.arbitration_id]:
                self.pending[r.response_id] = sent
            if sent is not None:
                store.stats.sent[sent.name] += 1
        if m.arbitration_id not in self.by_rx:
            return
        req = match_request(self.by_rx[m.arbitration_id], m.payload, self.pending.get(m.arbitration_id))
        if req is None:
            store.stats.ignored += 1
            return
        ok = store.answer(req, m.payload, m.stamp)
        vals = decode_values(req, m.payload[len(req.header):])[0] if ok else None
        self.answers.append(PolledAnswer(req.name, m.stamp, ok, vals or {}))

    def _report_damage(self) -> None:
        """Reassembly damage into the store's rejections as ``isotp:<reason>`` (only what is new)."""
        total: collections.Counter = collections.Counter()
        for r in self._asm.values():
            total.update(r.errors)
        for reason, n in total.items():
            if n > self._damage_reported[reason]:
                self.store.stats.rejected[f"isotp:{reason}"] += n - self._damage_reported[reason]
                self._damage_reported[reason] = n


def decode_poll_log(frames: Any, poll: PollConfig, n_cells: int = 0, n_temps: int = 0,
                    store: PollStore | None = None,
                    max_answers: int = MAX_ANSWERS) -> tuple[PollStore, collections.deque[PolledAnswer]]:
    """Polled values of a recorded drive: every answer to a configured request, decoded like the live poller.

    Returns the store (latest values, counters incl. ISO-TP damage as
    ``isotp:<reason>``) and the last ``max_answers`` answers in order (a
    whole day's drive keeps memory bounded; the store has every latest value).
    """
    dec = PollLogDecoder(poll, n_cells, n_temps, store, max_answers)
    dec.feed(frames)
    return dec.store, dec.answers
