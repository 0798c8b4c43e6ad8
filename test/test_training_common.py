"""Training helpers: exact low-pass filters on any time grid, drive loading with the v2 arrays, no eval drives."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bms_ai.sim.dataset import RecordedDrive, save_npz
from bms_ai.training.common import constant_rate_runs, load_training_drive, load_training_drives, lowpass, smooth


def _naive(t, x, tau, session=None, init="first", max_gap=30.0):
    y = np.empty_like(x, dtype=float)
    for k in range(len(t)):
        restart = k == 0 or not (0 < t[k] - t[k - 1] <= max_gap) or (session is not None and session[k] != session[k - 1])
        if restart:
            y[k] = x[k] if init == "first" else 0.0 * x[k]
        else:
            a = math.exp(-(t[k] - t[k - 1]) / tau)
            y[k] = a * y[k - 1] + (1 - a) * x[k]
    return y


def test_lowpass_is_exact_on_irregular_grids_with_restarts() -> None:
    rng = np.random.default_rng(0)
    dt = np.r_[np.full(50, 0.1), np.full(30, 1.0), [45.0], np.full(20, 0.1), rng.uniform(0.05, 2.0, 20)]
    t = np.r_[0.0, np.cumsum(dt)]
    x = rng.standard_normal((len(t), 3))
    session = np.zeros(len(t), int)
    session[70:] = 1
    for init in ("first", "zero"):
        got = lowpass(t, x, 5.0, session, init)
        np.testing.assert_allclose(got, _naive(t, x, 5.0, session, init), atol=1e-6)  # dt grouped to 1 us
    np.testing.assert_allclose(lowpass(t, x[:, 0], 5.0), _naive(t, x[:, 0], 5.0), atol=1e-6)


def test_constant_rate_runs_cover_every_sample_once() -> None:
    t = np.r_[np.arange(0, 10, 0.1), 50 + np.arange(0, 5, 1.0)]
    runs = constant_rate_runs(t, None, 30.0)
    covered = np.concatenate([np.arange(a, b) for a, b, _, _ in runs])
    assert np.array_equal(covered, np.arange(len(t)))
    assert [r for r in runs if r[3]] == [(0, 1, 0.0, True), (100, 101, 0.0, True)]   # start and the 40 s gap


def test_smooth_has_no_lag() -> None:
    t = np.arange(0.0, 2000.0, 1.0)
    x = np.sin(2 * np.pi * t / 1000.0)
    lag_fwd = np.argmax(lowpass(t, x, 50.0)[200:1400]) - np.argmax(x[200:1400])
    lag_zero = np.argmax(smooth(t, x, 50.0)[200:1400]) - np.argmax(x[200:1400])
    assert lag_fwd > 30 and abs(lag_zero) <= 1


def _drive(name: str, chem: str = "nmc") -> RecordedDrive:
    t = np.arange(0.0, 10.0, 1.0)
    return RecordedDrive(name=name, chemistry=chem, capacity_ah=5.0, t=t, current=np.zeros_like(t),
                         cell_v=np.full((10, 2), 3.7), cell_t=np.full((10, 1), 25.0), soc=np.full((10, 2), 0.5))


def test_v2_arrays_are_read_even_by_an_older_reader(tmp_path: Path) -> None:
    p = save_npz(tmp_path / "d1", _drive("d1"))
    z = dict(np.load(p / "drive.npz"))
    np.savez_compressed(p / "drive.npz", **z, ocv_soc=np.linspace(0, 1, 5), ocv_v=np.linspace(3, 4, 5),
                        session=np.r_[np.zeros(5), np.ones(5)].astype(np.int32))
    d = load_training_drive(p)
    assert np.allclose(d.ocv_v, np.linspace(3, 4, 5)) and d.session[-1] == 1 and d.cell_capacity_ah is None


def test_drives_are_filtered_by_chemistry_and_eval_is_refused(tmp_path: Path) -> None:
    save_npz(tmp_path / "train" / "a", _drive("a"))
    save_npz(tmp_path / "train" / "b", _drive("b", "lfp"))
    drives, paths = load_training_drives([tmp_path / "train"], "nmc")
    assert [d.name for d in drives] == ["a"] and paths == [tmp_path / "train" / "a"]
    save_npz(tmp_path / "eval" / "nmc" / "c", _drive("c"))
    with pytest.raises(ValueError, match="eval suite"):
        load_training_drives([tmp_path / "eval"], "nmc")
