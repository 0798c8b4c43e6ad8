"""The fleet HTML report: every section from plain dicts, plots embedded as PNG, escaped text."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from bms_ai.fleet.report import write_report


def _gate() -> dict:
    m = {"rmse": 0.02, "p95": 0.04, "max": 0.06, "mean_run_rmse": 0.02, "runs": 2}
    return {"accepted": False, "reasons": ["unfamiliar cells: RMSE 3.50 % vs current 4.00 % <needs more>"],
            "summary": {"classes": {"familiar": {"current": m, "candidate": m, "cc_oracle": m},
                                    "unfamiliar": {"current": {**m, "rmse": 0.04}, "candidate": {**m, "rmse": 0.035},
                                                   "cc_oracle": None}}, "cell_types": {}},
            "vehicles": [{"drive": "veh_a", "cell_type": "NMC_Ecker2015", "class": "unfamiliar", "hours": 72.0,
                          "current": {"rmse": 0.04}, "candidate": {"rmse": 0.035}, "cc_oracle": {"rmse": 0.03}}]}


def _inputs() -> dict:
    return dict(
        soh=[{"vehicle": "v1", "cell_type": "A", "soh": [0.91, 0.93, 0.92]}, {"vehicle": "v2", "cell_type": "B", "soh": 0.85}],
        gate=_gate(),
        alarms=[{"vehicle": "v1", "kind": "internal_short", "level": "ERROR", "score": 7.5},
                {"vehicle": "v2", "kind": "cell_imbalance", "level": "WARN", "score": 2.0},
                {"vehicle": "v2", "kind": "cell_imbalance", "level": "WARN"}],
        labels=[{"vehicle": "v1", "rmse": 0.008, "coverage": 0.97, "errors": [0.01, -0.02], "sigmas": [0.01, 0.015]},
                {"vehicle": "v2", "rmse": 0.02}])


@pytest.mark.drive   # seconds: matplotlib
def test_every_section_with_its_plot_and_table(tmp_path: Path) -> None:
    text = write_report(tmp_path / "rep", **_inputs()).read_text()
    for title in ("Fleet SOH", "SOC error before / after", "Alarms", "Anomaly ranking", "Pseudo-label quality"):
        assert title in text
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(pngs) == 4
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "&lt;needs more&gt;" in text and "<needs more>" not in text     # text is escaped
    assert "internal_short" in text and "7.5" in text
    assert "0.97" in text


def test_tables_without_plots_escape_text_and_count_alarms(tmp_path: Path) -> None:
    text = write_report(tmp_path / "rep", plots=False, **_inputs()).read_text()
    assert "data:image/png" not in text
    assert "&lt;needs more&gt;" in text and "<needs more>" not in text
    assert "<td>cell_imbalance</td><td>WARN</td><td>2</td>" in text
    assert "<td>veh_a</td><td>NMC_Ecker2015</td><td>unfamiliar</td><td>72.0</td><td>4.00</td><td>3.50</td><td>3.00</td>" in text
    assert "<td>A</td><td>3</td><td>0.910</td><td>0.920</td><td>0.930</td>" in text


def test_sections_appear_only_for_given_inputs(tmp_path: Path) -> None:
    text = write_report(tmp_path, labels=[{"vehicle": "v1", "rmse": 0.01}], plots=False).read_text()
    assert "Pseudo-label quality" in text and "Fleet SOH" not in text and "Alarms" not in text
    assert "No inputs given" in write_report(tmp_path / "empty", plots=False).read_text()
