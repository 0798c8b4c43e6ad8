"""Compiled signal extraction, per frame and vectorised.

cantools parses the DBC; decoding goes through plans compiled from its signal
model because the hot path needs a few integer operations per signal, not a
dict per frame. The same plan drives the scalar path (live bus: compiled
further into one fused decoder per CAN id, :func:`raw_source`) and the numpy
path (offline logs), so both give identical values. cantools stays the
reference in tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class SignalPlan:
    """Where a signal's raw bits sit and how they scale.

    ``shift`` counts from the least significant bit of the frame read as a
    little-endian integer (Intel signals) or as a big-endian integer of
    ``frame_bits`` (Motorola signals).
    """

    name: str
    shift: int
    length: int
    big_endian: bool
    signed: bool
    is_float: bool
    scale: float
    offset: float
    frame_bits: int

    @property
    def mask(self) -> int:
        """All ones over the signal's length."""
        return (1 << self.length) - 1

    def raw(self, le: int, be: int) -> int:
        """The raw (unscaled, sign-extended) integer from a frame's little/big-endian words."""
        v = ((be if self.big_endian else le) >> self.shift) & self.mask
        if self.signed and v >> (self.length - 1):
            v -= 1 << self.length
        return v

    def value(self, le: int, be: int) -> float:
        """The DBC-scaled value from a frame's words (floats reinterpreted from their bits)."""
        v = self.raw(le, be)
        if self.is_float:
            fmt = "<f" if self.length == 32 else "<d"
            ifmt = "<I" if self.length == 32 else "<Q"
            return struct.unpack(fmt, struct.pack(ifmt, v & self.mask))[0] * self.scale + self.offset
        return v * self.scale + self.offset

    def values(self, le: np.ndarray, be: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`value` over uint64 frame words (frames <= 8 bytes)."""
        words = be if self.big_endian else le
        raw = (words >> np.uint64(self.shift)) & np.uint64(self.mask)
        if self.is_float:
            if self.length == 32:
                out = raw.astype(np.uint32).view(np.float32).astype(np.float64)
            else:
                out = raw.view(np.float64).copy()
            return out * self.scale + self.offset
        if self.signed:
            r = raw.astype(np.int64)
            r = np.where(r >> (self.length - 1) & 1 == 1, r - (1 << self.length), r)
            return r.astype(np.float64) * self.scale + self.offset
        return raw.astype(np.float64) * self.scale + self.offset


def compile_signal(signal, frame_length: int) -> SignalPlan:
    """Build a plan from a cantools ``Signal`` for a frame of ``frame_length`` bytes."""
    frame_bits = 8 * frame_length
    if signal.byte_order == "little_endian":
        shift, big = signal.start, False
    else:
        # DBC Motorola start bit is the MSB in sawtooth numbering.
        msb_seq = 8 * (signal.start // 8) + (7 - signal.start % 8)
        shift, big = frame_bits - (msb_seq + signal.length), True
    if shift < 0:
        raise ValueError(f"signal {signal.name} does not fit in a {frame_length}-byte frame")
    conv = signal.conversion
    return SignalPlan(
        name=signal.name,
        shift=shift,
        length=signal.length,
        big_endian=big,
        signed=bool(signal.is_signed),
        is_float=bool(signal.is_float),
        scale=float(conv.scale),
        offset=float(conv.offset),
        frame_bits=frame_bits,
    )


def raw_source(plan: SignalPlan, var: str) -> list[str]:
    """Python statements that set ``var`` to :meth:`SignalPlan.raw` of the frame words ``le``/``be``.

    The fused per-frame decoders (:mod:`bms_ai.can.assembler`) are compiled
    from these lines: the same integer operations as :meth:`SignalPlan.raw`,
    with the shift, mask and sign bit as constants.
    """
    word = "be" if plan.big_endian else "le"
    lines = [f"{var} = ({word} >> {plan.shift}) & {plan.mask}" if plan.shift else f"{var} = {word} & {plan.mask}"]
    if plan.signed:
        lines.append(f"if {var} >> {plan.length - 1}: {var} -= {1 << plan.length}")
    return lines


def frame_words(data: bytes, frame_length: int) -> tuple[int, int]:
    """Little- and big-endian integers of a frame, zero padded to its DBC length."""
    if len(data) < frame_length:
        data = bytes(data) + bytes(frame_length - len(data))
    elif len(data) > frame_length:
        data = bytes(data[:frame_length])
    return int.from_bytes(data, "little"), int.from_bytes(data, "big")


def frames_to_words(payloads: np.ndarray, frame_length: int) -> tuple[np.ndarray, np.ndarray]:
    """uint64 little/big-endian words of an (N, 8) uint8 payload array.

    Big-endian words are aligned like :func:`frame_words`: a frame of
    ``frame_length`` bytes occupies the low ``8 * frame_length`` bits.
    """
    if frame_length > 8:
        raise ValueError("vectorised decode handles classic CAN frames (<= 8 bytes)")
    p = np.ascontiguousarray(payloads[:, :8], dtype=np.uint8)
    le = p.view("<u8").reshape(-1)
    be = p.view(">u8").reshape(-1).astype(np.uint64)
    if frame_length < 8:
        be = be >> np.uint64(8 * (8 - frame_length))
        le = le & np.uint64((1 << (8 * frame_length)) - 1)
    return le.astype(np.uint64), be
