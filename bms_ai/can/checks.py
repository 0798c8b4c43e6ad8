"""End-to-end protection checks: alive counters and checksums."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bms_ai.core.registry import Registry


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


# the pack config's ``crc.algorithm`` -> (per-frame function, vectorised rows function)
CRC_ALGORITHMS: Registry[tuple[Callable[[bytes], int], Callable[[np.ndarray], np.ndarray]]] = Registry("checksum algorithm")
CRC_ALGORITHMS.add("crc8_sae_j1850", (crc8_sae_j1850, crc8_sae_j1850_rows), "CRC-8 SAE J1850 (poly 0x1D, init and xor-out 0xFF)")

