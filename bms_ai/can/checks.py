"""End-to-end protection checks: alive counters and checksums."""

from __future__ import annotations

import numpy as np


def _crc8_table(poly: int) -> np.ndarray:
    table = np.zeros(256, dtype=np.uint8)
    for i in range(256):
        c = i
        for _ in range(8):
            c = ((c << 1) ^ poly) & 0xFF if c & 0x80 else (c << 1) & 0xFF
        table[i] = c
    return table


_J1850 = _crc8_table(0x1D)
_J1850_LIST = _J1850.tolist()


def crc8_sae_j1850(data: bytes) -> int:
    """CRC-8 SAE J1850 (poly 0x1D, init 0xFF, xor-out 0xFF); check('123456789') == 0x4B."""
    c = 0xFF
    t = _J1850_LIST
    for b in data:
        c = t[c ^ b]
    return c ^ 0xFF


def crc8_sae_j1850_rows(rows: np.ndarray) -> np.ndarray:
    """Vectorised CRC over each row of an (N, k) uint8 array."""
    c = np.full(rows.shape[0], 0xFF, dtype=np.uint8)
    for j in range(rows.shape[1]):
        c = _J1850[c ^ rows[:, j]]
    return c ^ np.uint8(0xFF)


CRC_ALGORITHMS = {"crc8_sae_j1850": (crc8_sae_j1850, crc8_sae_j1850_rows)}


def protected_bytes(data: bytes, crc_byte: int) -> bytes:
    """The bytes a checksum in byte ``crc_byte`` covers: every other byte of the frame."""
    return bytes(data[:crc_byte]) + bytes(data[crc_byte + 1:])
