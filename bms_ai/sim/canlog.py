"""Sensor model of the simulated BMS, and its CAN log.

What the BMS measures (noise, offsets, lag, sensor faults, dropped and
jittered frames) is modelled here; turning the values into frames is the
one pack encoder's job (:class:`bms_ai.can.encoder.PackEncoder`, vectorised
``encode_rows``), driven by the drive's pack config and its DBC, so the
simulator and the decoder cannot disagree about the bus. A 10-minute drive
(~850k frames) encodes in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cantools.database import Database

from bms_ai.can.decoder import PackDecoder
from bms_ai.can.encoder import PackEncoder
from bms_ai.can.packconfig import load_pack_config
from bms_ai.core.paths import share_path
from bms_ai.sim.profile import MODE_CHARGE, MODE_PARK, N_SERIES
from bms_ai.sim.simulator import DT, SimulatedDrive, limits_for

CAN_T0 = 1767225600.0  # 2026-01-01T00:00:00Z: CAN timestamp = CAN_T0 + truth t
N_CELLS = N_SERIES  # cells of the simulated pack (its pack config must carry as many)

# the simulated BMS's bus timing: offset of each message within its DBC cycle (s), and the share
# of a cycle over which the frames of one multiplexed cycle are spread
PHASE_S = {"BMS_PackMeas": 0.0001, "BMS_Status": 0.0003, "BMS_Limits": 0.0005,
           "BMS_CellVoltages": 0.0007, "BMS_CellTemps": 0.0041}
MUX_SPREAD = 0.5


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


def drive_encoder(drive: SimulatedDrive, dbc: Database | None = None) -> PackEncoder:
    """The encoder of the drive's pack config (its chemistry's reference pack); ``dbc`` overrides its DBC."""
    cfg = load_pack_config(share_path("config", drive.chemistry.pack_config))
    return PackEncoder(PackDecoder(cfg, dbc))


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


def _apply_sensor_faults(drive: SimulatedDrive, target: str, tq: np.ndarray, values: np.ndarray, channel: np.ndarray | None,
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


class _SensorModel:
    """What the simulated BMS measures for each of its messages, at the frames' send times.

    Random draws happen in a fixed order (per-channel errors first, then per
    message in the encoder's order), so a drive's CAN log is a pure function
    of its seed.
    """

    def __init__(self, drive: SimulatedDrive, enc: PackEncoder, rng: np.random.Generator) -> None:
        cfg = enc.decoder.cfg
        if (cfg.n_cells, cfg.n_temps) != (drive.v.shape[1], drive.sensor_temp.shape[1]):
            raise ValueError(f"pack config {cfg.source}: {cfg.n_cells} cells / {cfg.n_temps} sensors, "
                             f"the drive has {drive.v.shape[1]} / {drive.sensor_temp.shape[1]}")
        self.drive, self.enc, self.rng, self.n_cells = drive, enc, rng, cfg.n_cells
        sen = self.sen = drive.scenario.sensors
        # fixed per-channel errors
        self.i_gain = 1.0 + sen.current_gain * rng.standard_normal()
        self.i_off = sen.current_offset * rng.standard_normal()
        self.v_off = sen.cell_v_offset * rng.standard_normal(cfg.n_cells)
        self.pv_gain = 1.0 + 0.001 * rng.standard_normal()
        self.t_off = sen.temp_offset * rng.standard_normal(cfg.n_temps)
        self.sensor_t = _lag(drive.sensor_temp, sen.temp_lag_s)
        self.lim_chg, self.lim_dis = limits_for(drive)

    def measure(self, name: str, tq: np.ndarray, mux: np.ndarray) -> tuple[dict, dict, dict]:
        """(pack quantities, extra DBC signals, invalid flags) of message ``name`` at times ``tq``."""
        model = self.MESSAGES.get(name)
        if model is None:
            raise ValueError(f"the simulated BMS has no sensor model for message {name} of the pack config")
        return getattr(self, model)(tq, mux)

    # DBC message -> the method measuring its values
    MESSAGES = {"BMS_PackMeas": "_pack_meas", "BMS_Status": "_status", "BMS_Limits": "_limits",
                "BMS_CellVoltages": "_cell_voltages", "BMS_CellTemps": "_cell_temps"}

    def _pack_meas(self, tq, mux):
        d, sen, rng, n = self.drive, self.sen, self.rng, len(tq)
        i_meas = self.i_gain * _interp(d.t, d.current, tq) + self.i_off + sen.current_noise * rng.standard_normal(n)
        _apply_sensor_faults(d, "current", tq, i_meas, None, None)
        pv = self.pv_gain * _interp(d.t, d.pack_voltage, tq) + sen.pack_v_noise * rng.standard_normal(n)
        _apply_sensor_faults(d, "pack_v", tq, pv, None, None)
        return {"pack_voltage": pv, "pack_current": i_meas}, {"PackPower": pv * i_meas / 1000.0}, {}

    def _status(self, tq, mux):
        d = self.drive
        k = np.minimum((tq / DT).astype(int), len(d.t) - 1)
        mode = d.mode[k]
        closed = (mode != MODE_PARK).astype(int)
        return {"bms_state": mode, "contactor_plus": closed, "contactor_minus": closed,
                "charger_connected": (mode == MODE_CHARGE).astype(int), "charger_state": d.charger_state[k],
                "error_flags": 0, "isolation_kohm": 4000 + self.rng.integers(-20, 21, len(tq))}, {}, {}

    def _limits(self, tq, mux):
        d, chem = self.drive, self.drive.chemistry
        return ({"max_charge_current": _interp(d.t, self.lim_chg, tq),
                 "max_discharge_current": _interp(d.t, self.lim_dis, tq)},
                {"MaxChargeVoltage": self.n_cells * chem.v_max, "MinDischargeVoltage": self.n_cells * chem.v_min}, {})

    def _cell_voltages(self, tq, mux):
        return self._mux_block("BMS_CellVoltages", "cell_voltages", tq, mux, self.drive.v, self.v_off,
                               self.sen.cell_v_noise, "cell_v")

    def _cell_temps(self, tq, mux):
        return self._mux_block("BMS_CellTemps", "cell_temperatures", tq, mux, self.sensor_t, self.t_off,
                               self.sen.temp_noise, "cell_t")

    def _mux_block(self, name: str, key: str, tq: np.ndarray, mux: np.ndarray, truth: np.ndarray,
                   offset: np.ndarray, noise: float, target: str) -> tuple[dict, dict, dict]:
        """Channels of a multiplexed array frame (the encoder says which), sensor faults applied per slot."""
        d = self.drive
        idx = self.enc.element_index(name, key, mux)
        v = _interp(d.t, truth, tq, idx) + offset[idx] + noise * self.rng.standard_normal(idx.shape)
        inv = np.zeros(idx.shape, dtype=np.uint8)
        for slot in range(idx.shape[1]):
            col, ic = v[:, slot], inv[:, slot]
            _apply_sensor_faults(d, target, tq, col, idx[:, slot], ic)
            v[:, slot], inv[:, slot] = col, ic
        return {key: v}, {}, {key: inv}


def build_frames(drive: SimulatedDrive, dbc: Database | None = None) -> Frames:
    """Sensor model + schedule + encoding. Deterministic from the drive's seed."""
    enc = drive_encoder(drive, dbc)
    rng = np.random.default_rng([drive.seed, 2])
    model = _SensorModel(drive, enc, rng)
    sen = drive.scenario.sensors
    t_end = drive.t[-1]
    parts = []
    names = tuple(enc.messages())
    for mi, name in enumerate(names):
        tq, mux = enc.cycle_times(name, t_end, PHASE_S.get(name, 0.0), MUX_SPREAD)
        n = len(tq)
        values, signals, invalid = model.measure(name, tq, mux)
        payload = enc.encode_rows(name, mux, values, signals, invalid)
        data = np.zeros((n, 8), dtype=np.uint8)
        data[:, : payload.shape[1]] = payload
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
        fid, _ext = enc.frame_id(name)
        parts.append((ts[keep], np.full(keep.sum(), fid, np.uint32), data[keep], np.full(keep.sum(), mi, np.uint8)))
    t = np.concatenate([p[0] for p in parts])
    order = np.argsort(t, kind="stable")
    return Frames(t=t[order], arb_id=np.concatenate([p[1] for p in parts])[order],
                  data=np.concatenate([p[2] for p in parts])[order], msg=np.concatenate([p[3] for p in parts])[order],
                  names=names)


def iter_messages(frames: Frames, t0: float = CAN_T0):
    """The frames as python-can messages on CAN time ``t0 + t`` (channel 0, standard ids)."""
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
