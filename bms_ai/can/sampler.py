"""Fixed-rate pack samples on CAN time.

Samples are taken at instants k * period of CAN time, emitted when the first
frame after an instant arrives. Publishing therefore does not depend on how
fast a log is replayed or on executor timing: a drive gives the same samples
at 1x, at 100x and through the offline decoder.
"""

from __future__ import annotations

import math

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.frames import STAMP_MAX, STAMP_MIN, FrameArrays
from bms_ai.can.offline import Carry, DecodedLog, SampleTable, sample_chunk
from bms_ai.pack import PackSample


def first_k_at_or_after(t: float, period: float) -> int:
    """Smallest k with k * period >= t (exact in floating point, not just in theory).

    One correction step each way, no loop: stamps are bounded (frames.STAMP_MAX),
    so ``t / period`` is off by at most one.
    """
    k = math.ceil(t / period)
    if (k - 1) * period >= t:
        k -= 1
    if k * period < t:
        k += 1
    return k


class FixedRateSampler:
    """Pack samples at instants k * period of CAN time, fed frame by frame (live) or a whole log at once."""

    def __init__(self, assembler: PackAssembler, period: float, max_age: float | None = 1.0,
                 max_catchup: int = 600) -> None:
        self.asm = assembler
        self.period = period
        self.max_age = max_age
        self.max_catchup = max_catchup  # cap on samples emitted for one gap in the log
        self.skipped = 0
        self._k: int | None = None

    def _take(self, t: float) -> PackSample:
        s = self.asm.snapshot(t, self.max_age)
        s.stamp = t
        return s

    def feed(self, arb_id: int, data: bytes, ts: float, extended: bool = False) -> list[PackSample]:
        """Feed one frame; returns the samples whose instants this frame closes."""
        out: list[PackSample] = []
        try:
            tsf = float(ts)
        except (TypeError, ValueError):
            tsf = math.nan
        # the frame passes the time checks (a damaged stamp is rejected by the assembler)
        if STAMP_MIN <= tsf < STAMP_MAX and tsf >= self.asm.last_ts:
            if self._k is None:
                self._k = math.floor(tsf / self.period) + 1
            else:
                out = self._take_until(tsf)
        self.asm.feed(arb_id, data, ts, extended)
        return out

    def _take_until(self, t: float) -> list[PackSample]:
        """The grid's instants before CAN time ``t``, each once; past ``max_catchup`` skipped and counted."""
        out: list[PackSample] = []
        while self._k * self.period < t:
            if len(out) == self.max_catchup:  # a gap: skip to t
                k = first_k_at_or_after(t, self.period)
                self.skipped += k - self._k
                self._k = k
                break
            out.append(self._take(self._k * self.period))
            self._k += 1
        return out

    def close_until(self, t: float) -> list[PackSample]:
        """Samples of the instants before CAN time ``t`` that no frame has closed: a silent bus's samples.

        Each instant is taken once: the grid index moves past it, so frames
        that resume later neither repeat nor back-fill it (stamps stay
        strictly increasing, 1 / rate apart). At most ``max_catchup`` per call;
        the rest are skipped and counted, like a long gap between two frames.
        Before the first frame there is no grid and nothing is due.
        """
        if self._k is None or not STAMP_MIN <= t < STAMP_MAX:
            return []
        return self._take_until(t)

    def feed_message(self, msg) -> list[PackSample]:
        """Feed a ``can.Message`` (or :class:`~bms_ai.can.frames.Frame`); error/remote frames only count."""
        if getattr(msg, "is_error_frame", False) or getattr(msg, "is_remote_frame", False):
            self.asm.feed_message(msg)  # counted as rejected, never drives sampling
            return []
        return self.feed(msg.arbitration_id, msg.data, msg.timestamp, bool(msg.is_extended_id))

    def feed_burst(self, msgs) -> list[PackSample]:
        """:meth:`feed_message` of each frame in order, the samples of all of them in one list.

        The per-frame fast path of a live bus or a paced replay: the frames
        that close no instant go through the assembler's loop
        (:meth:`~bms_ai.can.assembler.PackAssembler.feed_frames`), the others
        one by one through :meth:`feed_message`.
        """
        out: list[PackSample] = []
        msgs = msgs if isinstance(msgs, list) else list(msgs)
        feed_frames = self.asm.feed_frames
        i, n = 0, len(msgs)
        while i < n:
            if self._k is not None:
                i = feed_frames(msgs, i, self._k * self.period)
                if i == n:
                    break
            out += self.feed_message(msgs[i])
            i += 1
        return out

    def feed_arrays(self, frames: FrameArrays) -> SampleTable:
        """Frames at once, vectorised: the samples frame-by-frame feeding would emit.

        The assembler (latest values, counters, CAN clock) and the sampler
        advance as if the frames had been fed one by one, so a log fed in
        chunks gives the same samples as fed whole.
        """
        table, decoded, carry = self.decode_arrays(frames)
        self.commit(table, decoded, carry)
        return table

    def decode_arrays(self, frames: FrameArrays) -> tuple[SampleTable, DecodedLog, Carry]:
        """:meth:`feed_arrays` without changing any state (decode off the lock, then :meth:`commit`)."""
        asm = self.asm
        counters = {n: st.last_counter for n, st in asm.stats.items() if st.last_counter >= 0}
        carry = Carry(asm.sample.copy(), dict(asm.status_stamps), asm.last_ts, self._k, counters)
        table, decoded = sample_chunk(frames, asm.decoder, self.period, self.max_age, self.max_catchup, carry)
        return table, decoded, carry

    def commit(self, table: SampleTable, decoded: DecodedLog, carry: Carry) -> None:
        """Take over the state :meth:`decode_arrays` reached (call in frame order, one chunk after the other)."""
        asm = self.asm
        c = asm.counters
        c.accepted += decoded.accepted
        for k, v in decoded.rejected.items():
            c.rejected[k] += v
        self.skipped += table.skipped
        asm.sample, asm.status_stamps, asm.last_ts = carry.sample, carry.status_stamps, carry.last_ts
        self._k = carry.k_next
        for name, v in carry.counters.items():
            asm.stats[name].last_counter = v
        for name, n in decoded.counter_errors.items():
            asm.stats[name].counter_errors += n
        for name, (n, first, last) in decoded.received.items():  # receive times: timeouts and rates
            st = asm.stats[name]
            st.first_rx = first if st.count == 0 else st.first_rx
            st.count += n
            st.last_rx = last
