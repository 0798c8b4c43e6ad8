"""Training smoke test (slow): PyBaMM drives -> `bms-ai train soc` -> verified ONNX in a model dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.pybamm

pytest.importorskip("torch")
pytest.importorskip("pybamm")


@pytest.mark.slow
def test_train_soc_smoke_is_reproducible(tmp_path: Path) -> None:
    from bms_ai.cli import main
    from bms_ai.estimation.soc import soc_model_expectation
    from bms_ai.models.manifest import read_manifest
    from bms_ai.models.runtime import verify_and_load

    data = tmp_path / "drives"
    assert main(["train", "synth", "--chemistry", "nmc", "--seeds", "100-102", "--duration", "400", "--cells", "1",
                 "--out", str(data)]) == 0
    outs = []
    for k in range(2):
        out = tmp_path / f"m{k}"
        assert main(["train", "soc", "--chemistry", "nmc", "--data", str(data), "--out", str(out),
                     "--epochs", "1", "--seed", "3"]) == 0
        entries, errors = read_manifest(out)
        assert not errors and len(entries) == 1
        e = entries[0]
        assert e.params <= 20000 and e.feature_version == soc_model_expectation()["feature_version"]
        res = verify_and_load(out, e, soc_model_expectation())
        assert res.model is not None, res.reason
        soc, sig = res.model.run(np.zeros((96, e.inputs[0].shape[-1]), np.float32))
        assert soc.shape == (96, 1)
        outs.append(e.sha256)
    assert outs[0] == outs[1]     # same seed -> byte-identical model
