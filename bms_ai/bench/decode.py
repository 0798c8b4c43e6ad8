"""Decode benchmarks: per-frame decode+assemble vs bare cantools, offline vectorised path, BLF reading."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def _synthetic_frames(seconds: float):
    from bms_ai.can.decoder import PackDecoder
    from bms_ai.can.encoder import PackEncoder
    from bms_ai.can.packconfig import load_pack_config
    from bms_ai.core.paths import default_pack_config
    from bms_ai.pack import PackSample

    dec = PackDecoder(load_pack_config(default_pack_config()))
    enc = PackEncoder(dec)
    rng = np.random.default_rng(0)
    s = PackSample.empty(dec.cfg.n_cells, dec.cfg.n_temps)
    frames = []
    for t, name, mux in enc.schedule(0.0, seconds):
        s.cell_voltages[:] = 3.7 + 0.01 * rng.standard_normal(dec.cfg.n_cells)
        s.cell_temperatures[:] = 25 + rng.standard_normal(dec.cfg.n_temps)
        s.pack_voltage, s.pack_current = 355.0, float(rng.normal(-20, 30))
        fid, ext = enc.frame_id(name)
        frames.append((fid, enc.encode(name, mux, s), t, ext))
    return dec, frames


def bench_decode(quick: bool = False) -> dict[str, Any]:
    """Per-frame decode+assemble vs a bare cantools decode loop; offline vectorised path."""
    from bms_ai.can.assembler import PackAssembler
    from bms_ai.can.frames import FrameArrays
    from bms_ai.can.offline import decode_frames, sample, sample_times
    from bms_ai.can.sampler import FixedRateSampler

    dec, frames = _synthetic_frames(5.0 if quick else 40.0)
    by_id = {fid: dec.db.get_message_by_frame_id(fid) for fid, *_ in frames}

    def cantools_loop() -> float:
        t = time.perf_counter()
        for fid, data, _ts, _ext in frames:
            by_id[fid].decode(data)
        return time.perf_counter() - t

    def ours() -> tuple[float, list]:
        sampler = FixedRateSampler(PackAssembler(dec), 0.1)
        out = []
        t = time.perf_counter()
        for fid, data, ts, ext in frames:
            out.extend(sampler.feed(fid, data, ts, ext))
        return time.perf_counter() - t, out

    import can

    msgs = [can.Message(timestamp=ts, arbitration_id=fid, data=data, is_extended_id=ext) for fid, data, ts, ext in frames]
    arrays = FrameArrays.from_messages(msgs)

    def offline():
        t = time.perf_counter()
        d = decode_frames(arrays, dec)
        table = sample(d, sample_times(d.t_first, d.t_last, 0.1, d.frame_ts), 1.0)
        return time.perf_counter() - t, table

    runs = 3
    t_ct = min(cantools_loop() for _ in range(runs))
    res = [ours() for _ in range(runs)]
    t_ours = min(r[0] for r in res)
    live = res[0][1]
    offl = [offline() for _ in range(runs)]
    t_off = min(r[0] for r in offl)
    table = offl[0][1]
    identical = len(live) == len(table) and np.array_equal(
        np.stack([s.cell_voltages for s in live]), table.cell_voltages, equal_nan=True)
    n = len(frames)
    blf = _blf_read(msgs)
    return {
        **blf,
        "frames": n,
        "decode_assemble_frames_per_s": n / t_ours,
        "cantools_decode_frames_per_s": n / t_ct,
        "ratio_to_cantools": t_ours / t_ct,
        "offline_vectorised_frames_per_s": n / t_off,
        "offline_identical_to_per_frame": bool(identical),
        "targets": {"decode_assemble_frames_per_s": ">= 100000", "ratio_to_cantools": "<= 2",
                    "offline_vectorised_frames_per_s": ">= 1000000"},
    }


def _blf_read(msgs) -> dict[str, Any]:
    """Reading a BLF log: our array reader vs python-can's message reader, same file."""
    import tempfile

    import can

    from bms_ai.can.frames import FrameArrays
    from bms_ai.can.logs import iter_log, read_log

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/bench.blf"
        with can.Logger(path) as log:
            for m in msgs:
                log.on_message_received(m)
        t = time.perf_counter()
        fast = read_log(path)
        t_fast = time.perf_counter() - t
        t = time.perf_counter()
        ref = FrameArrays.from_messages(iter_log(path))
        t_ref = time.perf_counter() - t
    same = all(np.array_equal(getattr(fast, f), getattr(ref, f)) for f in ("ts", "ids", "data", "dlc"))
    return {"blf_read_frames_per_s": len(fast) / t_fast, "python_can_blf_read_frames_per_s": len(ref) / t_ref,
            "blf_read_identical_to_python_can": bool(same)}
