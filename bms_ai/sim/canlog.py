"""Sensor model + CAN encoding of a simulated drive.

Frames are packed vectorised per message from the cantools signal
definitions of the reference DBC (same raw conversion as
``cantools`` ``encode_message``: raw = round((phys - offset) / scale),
half-to-even), so a 10-minute drive (~850k frames) encodes in seconds.
test_sim_can.py checks byte equality with cantools on sampled frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bms_ai.can.checks import crc8_sae_j1850_rows
from bms_ai.core.paths import share_path
from bms_ai.sim.profile import MODE_PARK
from bms_ai.sim.simulator import DT, N_TEMP, limits_for
from bms_ai.sim.simulator import SimulatedDrive as Drive

DBC_PATH = share_path("dbc", "bms_ai_pack96.dbc")
CAN_T0 = 1767225600.0  # 2026-01-01T00:00:00Z: CAN timestamp = CAN_T0 + truth t
N_CELLS = 96

# (message, period s, phase s, frames per period)
SCHEDULE = {
    "BMS_PackMeas": (0.010, 0.0001, 1),
    "BMS_Status": (0.100, 0.0003, 1),
    "BMS_Limits": (0.100, 0.0005, 1),
    "BMS_CellVoltages": (0.020, 0.0007, 24),
    "BMS_CellTemps": (0.100, 0.0041, 8),
}


@dataclass
class Frames:
    """All frames of a drive, sorted by timestamp."""

    t: np.ndarray        # (F,) s since drive start (truth time base, jitter included)
    arb_id: np.ndarray   # (F,) uint32
    data: np.ndarray     # (F, 8) uint8
    msg: np.ndarray      # (F,) uint8 index into names
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.t)


def load_dbc(path: Path | str = DBC_PATH):
    import cantools

    return cantools.database.load_file(str(path), strict=True)


def pack_signals(message, values: dict[str, np.ndarray], n: int) -> np.ndarray:
    """(n, length) uint8 payloads; missing signals are 0. Little-endian signals only."""
    word = np.zeros(n, dtype=np.uint64)
    for sig in message.signals:
        if sig.byte_order != "little_endian":
            raise ValueError(f"{message.name}.{sig.name}: big-endian packing not supported by the simulator")
        if sig.name not in values:
            continue
        phys = np.broadcast_to(np.asarray(values[sig.name], dtype=float), (n,))
        raw = np.round((phys - sig.offset) / sig.scale)
        if sig.is_signed:
            lo, hi = -(1 << (sig.length - 1)), (1 << (sig.length - 1)) - 1
        else:
            lo, hi = 0, (1 << sig.length) - 1
        raw = np.clip(np.nan_to_num(raw, nan=0.0), lo, hi).astype(np.int64)
        mask = (1 << sig.length) - 1
        word |= (raw.astype(np.uint64) & np.uint64(mask)) << np.uint64(sig.start)
    return word.astype("<u8").view(np.uint8).reshape(n, 8)[:, : message.length]


def _interp(t_truth: np.ndarray, arr: np.ndarray, tq: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """Linear interpolation of ``arr`` (N,) or (N, m) at times tq; ``cols`` (len(tq), k) picks columns per row."""
    x = np.clip((tq - t_truth[0]) / DT, 0.0, len(t_truth) - 1.000001)
    i = x.astype(np.int64)
    f = x - i
    j = np.minimum(i + 1, len(t_truth) - 1)
    if arr.ndim == 1:
        return arr[i] * (1 - f) + arr[j] * f
    if cols is not None:
        out = arr[i[:, None], cols]
        out *= (1 - f)[:, None]
        out += arr[j[:, None], cols] * f[:, None]
        return out
    return arr[i] * (1 - f)[:, None] + arr[j] * f[:, None]


def _lag(x: np.ndarray, tau: float) -> np.ndarray:
    """First-order sensor lag along axis 0 (truth step DT)."""
    if tau <= 0:
        return x
    from scipy.signal import lfilter

    a = DT / (tau + DT)
    y = lfilter([a], [1.0, a - 1.0], x - x[0], axis=0)
    return y + x[0]


def _apply_sensor_faults(drive: Drive, target: str, tq: np.ndarray, values: np.ndarray, channel: np.ndarray | None,
                         invalid: np.ndarray | None) -> None:
    """In-place: stuck/drift/open-wire faults on the channels of ``target``."""
    for f in drive.scenario.faults:
        if f.target != target or f.kind not in ("sensor_stuck", "sensor_drift", "open_wire"):
            continue
        act = f.active(tq)
        if channel is not None:
            act = act & (channel == f.cell)
        if not act.any():
            continue
        if f.kind == "sensor_stuck":
            held = values[act][0] if values[act].size else 0.0
            values[act] = held
        elif f.kind == "sensor_drift":
            values[act] = values[act] + f.magnitude * (tq[act] - f.onset_s) / 3600.0
        elif f.kind == "open_wire":
            values[act] = 0.0
            if invalid is not None:
                invalid[act] = 1


def _mux_block(drive: Drive, tq: np.ndarray, mux: np.ndarray, truth: np.ndarray, offset: np.ndarray,
               noise: np.ndarray, target: str, prefix: str) -> dict[str, np.ndarray]:
    """Signal values of a 4-slot multiplexed frame: element = mux * 4 + slot, sensor faults applied."""
    idx = mux[:, None] * 4 + np.arange(4, dtype=np.int32)[None, :]
    v = _interp(drive.t, truth, tq, idx) + offset[idx] + noise
    inv = np.zeros(idx.shape, dtype=np.uint8)
    for slot in range(4):
        col, ic = v[:, slot], inv[:, slot]
        _apply_sensor_faults(drive, target, tq, col, idx[:, slot], ic)
        v[:, slot], inv[:, slot] = col, ic
    vals: dict[str, np.ndarray] = {f"{prefix}Mux": mux}
    for slot in range(4):
        vals[f"{prefix}{slot}"] = v[:, slot]
        vals[f"{prefix}{slot}_Invalid"] = inv[:, slot]
    return vals


def build_frames(drive: Drive, dbc=None) -> Frames:
    """Sensor model + schedule + encoding. Deterministic from the drive's seed."""
    db = dbc or load_dbc()
    rng = np.random.default_rng([drive.seed, 2])
    sen = drive.scenario.sensors
    t_end = drive.t[-1]
    # fixed per-channel errors
    i_gain = 1.0 + sen.current_gain * rng.standard_normal()
    i_off = sen.current_offset * rng.standard_normal()
    v_off = sen.cell_v_offset * rng.standard_normal(N_CELLS)
    pv_gain = 1.0 + 0.001 * rng.standard_normal()
    t_off = sen.temp_offset * rng.standard_normal(N_TEMP)
    sensor_t = _lag(drive.sensor_temp, sen.temp_lag_s)
    lim_chg, lim_dis = limits_for(drive)
    v_max, v_min = drive.chemistry.v_max, drive.chemistry.v_min

    parts = []
    names = tuple(SCHEDULE)
    for mi, (name, (period, phase, per)) in enumerate(SCHEDULE.items()):
        msg = db.get_message_by_name(name)
        n_cyc = int(np.floor((t_end - phase) / period)) + 1
        cyc = np.repeat(np.arange(n_cyc, dtype=np.int32), per)
        mux = np.tile(np.arange(per, dtype=np.int32), n_cyc)
        tq = cyc * period + phase + mux * (period / max(per, 1)) * 0.5
        n = len(tq)
        vals: dict[str, np.ndarray] = {}
        seq = np.arange(n)
        if name == "BMS_PackMeas":
            i_true = _interp(drive.t, drive.current, tq)
            i_meas = i_gain * i_true + i_off + sen.current_noise * rng.standard_normal(n)
            _apply_sensor_faults(drive, "current", tq, i_meas, None, None)
            pv = pv_gain * _interp(drive.t, drive.pack_voltage, tq) + sen.pack_v_noise * rng.standard_normal(n)
            _apply_sensor_faults(drive, "pack_v", tq, pv, None, None)
            vals = {"PackMeas_AliveCounter": seq % 16, "PackVoltageValid": 1, "PackCurrentValid": 1,
                    "PackVoltage": pv, "PackCurrent": i_meas, "PackPower": pv * i_meas / 1000.0}
        elif name == "BMS_Status":
            k = np.minimum((tq / DT).astype(int), len(drive.t) - 1)
            mode = drive.mode[k]
            closed = (mode != MODE_PARK).astype(int)
            vals = {"Status_AliveCounter": seq % 16, "BmsState": mode, "ContactorPlus": closed, "ContactorMinus": closed,
                    "PrechargeRelay": 0, "ChargerConnected": (mode == 4).astype(int), "ChargerState": drive.charger_state[k],
                    "ErrorFlags": 0, "IsolationResistance": 4000 + rng.integers(-20, 21, n)}
        elif name == "BMS_Limits":
            vals = {"MaxChargeCurrent": _interp(drive.t, lim_chg, tq), "MaxDischargeCurrent": _interp(drive.t, lim_dis, tq),
                    "MaxChargeVoltage": N_CELLS * v_max, "MinDischargeVoltage": N_CELLS * v_min}
        elif name == "BMS_CellVoltages":
            vals = _mux_block(drive, tq, mux, drive.v, v_off, sen.cell_v_noise * rng.standard_normal((n, 4)),
                              "cell_v", "CellV")
        elif name == "BMS_CellTemps":
            vals = _mux_block(drive, tq, mux, sensor_t, t_off, sen.temp_noise * rng.standard_normal((n, 4)),
                              "cell_t", "CellT")
        data = np.zeros((n, 8), dtype=np.uint8)
        data[:, : msg.length] = pack_signals(msg, vals, n)
        crc_sig = {"BMS_PackMeas": "PackMeas_Checksum", "BMS_Status": "Status_Checksum"}.get(name)
        if crc_sig is not None:
            data[:, 0] = crc8_sae_j1850_rows(data[:, 1:8])
        # what is actually on the bus: BMS asleep while parked, CAN timeouts, random drops
        keep = np.ones(n, dtype=bool)
        k = np.minimum((tq / DT).astype(int), len(drive.t) - 1)
        keep &= drive.mode[k] != MODE_PARK
        for f in drive.scenario.faults:
            if f.kind == "can_timeout" and f.target == name:
                keep &= ~f.active(tq)
        keep &= rng.random(n) >= sen.drop_prob
        jit = np.clip(sen.jitter_s * rng.standard_normal(n), -3 * sen.jitter_s, 3 * sen.jitter_s)
        ts = np.maximum(tq + jit, 0.0)
        parts.append((ts[keep], np.full(keep.sum(), msg.frame_id, np.uint32), data[keep], np.full(keep.sum(), mi, np.uint8)))
    t = np.concatenate([p[0] for p in parts])
    order = np.argsort(t, kind="stable")
    return Frames(t=t[order], arb_id=np.concatenate([p[1] for p in parts])[order],
                  data=np.concatenate([p[2] for p in parts])[order], msg=np.concatenate([p[3] for p in parts])[order],
                  names=names)


def iter_messages(frames: Frames, t0: float = CAN_T0):
    import can

    ts = (t0 + frames.t).tolist()
    ids = frames.arb_id.tolist()
    for k in range(len(ts)):
        yield can.Message(timestamp=ts[k], arbitration_id=ids[k], is_extended_id=False,
                          data=frames.data[k].tobytes(), channel=0)


def write_blf(frames: Frames, path: Path | str, t0: float = CAN_T0, fast: bool = True) -> None:
    """BLF via python-can. Header start/stop times come from the first/last
    frame (no wall clock), so the file is a pure function of the frames.

    ``fast`` packs the CAN_MESSAGE object body here and hands it to the
    writer's object layer (what ``on_message_received`` does for a classic
    data frame on channel 0, without building ``can.Message``s); it falls back
    to the public path if python-can's internals differ. test_sim_drive checks
    both paths give identical files.
    """
    import can

    with can.BLFWriter(str(path), channel=1, compression_level=6) as w:
        blf = can.io.blf
        add = getattr(w, "_add_object", None)
        pack = getattr(getattr(blf, "CAN_MSG_STRUCT", None), "pack", None)
        kind = getattr(blf, "CAN_MESSAGE", None)
        if fast and add is not None and pack is not None and kind is not None:
            ts = (t0 + frames.t).tolist()
            ids = frames.arb_id.tolist()
            data = frames.data
            for k in range(len(ts)):
                add(kind, pack(1, 0, 8, ids[k], data[k].tobytes()), ts[k])
        else:
            for m in iter_messages(frames, t0):
                w.on_message_received(m)


def write_asc(frames: Frames, path: Path | str, t0: float = CAN_T0) -> None:
    """ASC via python-can, with the wall-clock 'date' header line replaced by t0."""
    import datetime

    import can

    path = Path(path)
    with can.ASCWriter(str(path), channel=1) as w:
        for m in iter_messages(frames, t0):
            w.on_message_received(m)
    lines = path.read_text().splitlines(keepends=True)
    stamp = datetime.datetime.fromtimestamp(t0, tz=datetime.timezone.utc).strftime("%a %b %d %I:%M:%S.000 %p %Y")
    for i, line in enumerate(lines[:6]):
        if line.startswith("date "):
            lines[i] = f"date {stamp}\n"
        elif line.startswith("Begin Triggerblock"):
            lines[i] = f"Begin Triggerblock {stamp}\n"
    path.write_text("".join(lines))
