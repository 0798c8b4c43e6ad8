"""ONNX runtime wrapper: hash + contract verification, fallback reasons, hot reload."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bms_ai.core.files import sha256_file
from bms_ai.estimation.features import FEATURE_VERSION, N_FEATURES
from bms_ai.estimation.soc import SocEstimator, soc_model_expectation
from bms_ai.models.manifest import ModelEntry, TensorSpec, read_manifest, upsert_entry
from bms_ai.models.runtime import ModelRegistry, OutputGuard, verify_and_load


def _soc_onnx(path: Path, n_in: int = N_FEATURES, bias: float = 0.0, input_name: str = "features") -> None:
    """A real ONNX graph: soc = sigmoid(x @ w + b), sigma = 0.02 (built without torch)."""
    w = np.zeros((n_in, 1), np.float32)
    w[0, 0] = 1.0
    nodes = [
        helper.make_node("MatMul", [input_name, "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["eta"]),
        helper.make_node("Mul", ["xw", "zero"], ["xz"]),
        helper.make_node("Add", ["xz", "s"], ["sigma"]),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([bias], np.float32), "b"),
             numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
             numpy_helper.from_array(np.array([0.02], np.float32), "s")]
    g = helper.make_graph(nodes, "soc", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", n_in])],
                          [helper.make_tensor_value_info("eta", TensorProto.FLOAT, ["batch", 1]),
                           helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["batch", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


def _entry(d: Path, version: int, n_in: int = N_FEATURES, **kw) -> ModelEntry:
    f = f"soc_test_v{version}.onnx"
    _soc_onnx(d / f, n_in=n_in, bias=kw.pop("bias", 0.0), input_name=kw.pop("input_name", "features"))
    return ModelEntry(name="soc_test", version=version, file=f, sha256=sha256_file(d / f), task="soc",
                      chemistry="nmc", inputs=[TensorSpec("features", ["batch", n_in])],
                      outputs=[TensorSpec("eta", ["batch", 1]), TensorSpec("sigma", ["batch", 1])],
                      feature_version=kw.pop("feature_version", FEATURE_VERSION), **kw)


def test_good_model_loads_and_runs(tmp_path: Path) -> None:
    e = _entry(tmp_path, 1)
    upsert_entry(tmp_path, e)
    entries, errors = read_manifest(tmp_path)
    assert errors == [] and entries[0].sha256 == e.sha256
    res = verify_and_load(tmp_path, entries[0], soc_model_expectation())
    assert res.model is not None, res.reason
    soc, sig = res.model.run(np.zeros((96, N_FEATURES), np.float32))
    assert soc.shape == (96, 1) and np.allclose(soc, 0.5) and np.allclose(sig, 0.02)
    assert res.model.session.get_session_options().intra_op_num_threads == 1


def test_hash_mismatch_falls_back_with_reason(tmp_path: Path) -> None:
    e = _entry(tmp_path, 1)
    upsert_entry(tmp_path, e)
    with open(tmp_path / e.file, "r+b") as f:           # corrupt one byte of the model file
        f.seek(-5, os.SEEK_END)
        b = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    reg = ModelRegistry(tmp_path, {"soc": soc_model_expectation()})
    reg.poll()
    slot = reg.slot("soc", "nmc")
    assert slot.model is None and "sha256 mismatch" in slot.reason
    est = SocEstimator(4, 2, "nmc", 5.0, model=slot.model, model_reason=slot.reason, soc0=0.5)
    out = est.step(0.0, 0.0, np.full(4, 3.7), np.full(2, 25.0))
    assert out.method == "classical" and "sha256 mismatch" in out.fallback_reason
    assert np.all(np.isfinite(out.cell_soc))


@pytest.mark.parametrize("kind", ["n_features", "input_name", "feature_version", "missing_file", "garbage"])
def test_wrong_contract_is_rejected(tmp_path: Path, kind: str) -> None:
    if kind == "n_features":
        e = _entry(tmp_path, 1, n_in=N_FEATURES + 2)
    elif kind == "input_name":
        e = _entry(tmp_path, 1, input_name="x")
    elif kind == "feature_version":
        e = _entry(tmp_path, 1, feature_version="soc-cell-v0")
    elif kind == "missing_file":
        e = _entry(tmp_path, 1)
        (tmp_path / e.file).unlink()
    else:
        e = _entry(tmp_path, 1)
        (tmp_path / e.file).write_bytes(b"not an onnx model")
        e.sha256 = sha256_file(tmp_path / e.file)   # hash fine, content broken
    res = verify_and_load(tmp_path, e, soc_model_expectation())
    assert res.model is None and res.reason
    expected = {"n_features": "features", "input_name": "name mismatch", "feature_version": "feature version",
                "missing_file": "missing", "garbage": "load failed"}[kind]
    assert expected in res.reason


def test_hot_reload_swaps_good_and_rejects_bad(tmp_path: Path) -> None:
    upsert_entry(tmp_path, _entry(tmp_path, 1, bias=0.0))
    reg = ModelRegistry(tmp_path, {"soc": soc_model_expectation()})
    assert reg.poll()
    assert reg.get("soc", "nmc").version == 1
    est = SocEstimator(2, 1, "nmc", 5.0, model=reg.get("soc", "nmc"), soc0=0.5)
    est.step(0.0, 0.0, np.full(2, 0.0), np.full(1, 25.0))
    # drop a new version in as a sidecar (atomic for the reader: file first, then its manifest)
    e2 = _entry(tmp_path, 2, bias=1.0)
    (tmp_path / (e2.file + ".json")).write_text(json.dumps(e2.to_dict()))
    assert reg.poll()
    m2 = reg.get("soc", "nmc")
    assert m2.version == 2
    est.set_model(m2)
    z, _ = m2.run(np.zeros((1, N_FEATURES), np.float32))
    assert z[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-5)
    # a bad v3 (hash mismatch) is rejected; v2 stays active
    e3 = _entry(tmp_path, 3)
    e3.sha256 = "0" * 64
    (tmp_path / (e3.file + ".json")).write_text(json.dumps(e3.to_dict()))
    assert not reg.poll()
    assert reg.get("soc", "nmc").version == 2
    assert "sha256 mismatch" in reg.last_rejection("soc", "nmc")
    assert any("rejected" in ev for ev in reg.events)
    # polling again without changes does not retry the bad model
    n_events = len(reg.events)
    assert not reg.poll() and len(reg.events) == n_events


def test_shipped_models_verify(root: Path, tmp_path: Path) -> None:
    """Everything committed under models/ passes its own hash and contract checks."""
    entries, errors = read_manifest(root / "models")
    assert not errors
    assert {("soc", "nmc"), ("soc", "lfp")} <= {e.key for e in entries}
    for e in entries:
        res = verify_and_load(root / "models", e, soc_model_expectation() if e.task == "soc" else None)
        assert res.model is not None, res.reason
        assert e.params <= 20000
    shutil.copytree(root / "models", tmp_path / "m")
    reg = ModelRegistry(tmp_path / "m", {"soc": soc_model_expectation()})
    reg.poll()
    assert reg.get("soc", "lfp") is not None


# ----------------------------------------------------------------------------- run-time output guard

def _trap_onnx(path: Path, kind: str, n_in: int = N_FEATURES) -> None:
    """A model that is fine on the zero smoke input and wrong on real ones (x0 = a cell voltage > 0).

    ``nan``: eta = sigmoid(x0) + 0 * sqrt(-x0), NaN for x0 > 0; ``huge``: eta = 1e30 * x0.
    """
    w = np.zeros((n_in, 1), np.float32)
    w[0, 0] = 1.0
    nodes = [helper.make_node("MatMul", ["features", "w"], ["xw"])]
    if kind == "nan":
        nodes += [helper.make_node("Neg", ["xw"], ["nx"]), helper.make_node("Sqrt", ["nx"], ["r"]),
                  helper.make_node("Mul", ["r", "zero"], ["r0"]), helper.make_node("Sigmoid", ["xw"], ["sg"]),
                  helper.make_node("Add", ["sg", "r0"], ["eta"])]
    else:
        nodes += [helper.make_node("Mul", ["xw", "big"], ["eta"])]
    nodes += [helper.make_node("Mul", ["xw", "zero"], ["xz"]), helper.make_node("Add", ["xz", "s"], ["sigma"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
             numpy_helper.from_array(np.array([1e30], np.float32), "big"),
             numpy_helper.from_array(np.array([0.02], np.float32), "s")]
    g = helper.make_graph(nodes, "trap", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n_in])],
                          [helper.make_tensor_value_info("eta", TensorProto.FLOAT, ["batch", 1]),
                           helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["batch", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


def _trap_entry(d: Path, kind: str) -> ModelEntry:
    f = f"trap_{kind}.onnx"
    _trap_onnx(d / f, kind)
    return ModelEntry(name=f"trap_{kind}", version=1, file=f, sha256=sha256_file(d / f), task="soc", chemistry="nmc",
                      inputs=[TensorSpec("features", ["batch", N_FEATURES])],
                      outputs=[TensorSpec("eta", ["batch", 1], units=["V"], range=[-2.0, 2.0]),
                               TensorSpec("sigma", ["batch", 1], units=["V"], range=[0.0, 1.0])],
                      feature_version=FEATURE_VERSION)


@pytest.mark.parametrize(("kind", "needle", "counter"), [("nan", "non-finite", "guard_non_finite"),
                                                         ("huge", "outside the declared range", "guard_out_of_range")])
def test_guard_refuses_outputs_the_smoke_test_cannot_see(tmp_path: Path, kind: str, needle: str, counter: str) -> None:
    """NaN or 1e30 only on real inputs: the model loads, but the guard refuses those rows and counts them."""
    e = _trap_entry(tmp_path, kind)
    res = verify_and_load(tmp_path, e, soc_model_expectation())
    assert res.model is not None, res.reason                 # zeros: finite and in range
    x = np.zeros((4, N_FEATURES), np.float32)
    x[1:, 0] = 3.7                                           # three cells with a real voltage
    outs, verdict = res.model.run_guarded(x)
    assert verdict.ok.tolist() == [True, False, False, False] and not verdict.all_ok
    assert needle in verdict.reason and "eta" in verdict.reason
    stats = res.model.guard.stats()
    assert stats[counter] == 3 and stats["guard_rejected_rows"] == 3 and stats["guard_rejected_calls"] == 1
    assert res.model.guard.last_reason.startswith(f"trap_{kind}@1: ")
    _, ok = res.model.run_guarded(np.zeros((4, N_FEATURES), np.float32))
    assert ok.all_ok and res.model.guard.consecutive_rejected_calls == 0


def test_guard_refuses_wrong_shapes_and_inference_errors(tmp_path: Path) -> None:
    """Outputs that do not line up with the manifest, or an inference error, refuse every row."""
    e = _trap_entry(tmp_path, "huge")
    res = verify_and_load(tmp_path, e, soc_model_expectation())
    assert res.model is not None
    guard = res.model.guard
    v = guard.check([np.zeros((3, 1)), np.zeros((2, 1))])
    assert v.ok.tolist() == [False] * 3 and "do not match" in v.reason
    outs, v = res.model.run_guarded(np.zeros((2, 3), np.float32))      # wrong feature count
    assert outs == [] and v.ok.tolist() == [False, False] and v.reason.startswith("inference failed")
    assert guard.bad_shape == 1 and guard.consecutive_rejected_calls == 2


def test_out_of_range_on_smoke_input_is_refused_at_load(tmp_path: Path) -> None:
    """A declared range is checked at load too: eta = sigmoid(0) = 0.5 outside [0.6, 1] never goes live."""
    e = _entry(tmp_path, 1)
    e.outputs[0].range = [0.6, 1.0]
    res = verify_and_load(tmp_path, e, soc_model_expectation())
    assert res.model is None and "smoke input: eta: 0.5 outside the declared range [0.6, 1]" in res.reason


# ----------------------------------------------------------------------------- broken manifests at start and on reload

@pytest.mark.parametrize("text", ["null", "[1, 2, 3]", '{"models": null}'])
def test_broken_manifest_at_start_falls_back_with_reason(tmp_path: Path, text: str) -> None:
    """The estimator starts on its classical filter and says why, instead of crashing."""
    from bms_ai.estimation.pack import PackEstimator

    (tmp_path / "manifest.json").write_text(text)
    est = PackEstimator.from_model_dir(tmp_path, "nmc", 5.0)
    est.poll_models()
    model, reason = est.soc_model()
    assert model is None and reason.startswith("no model: manifest.json: ")
    assert any(ev.startswith("manifest error:") for ev in est.model_events)


@pytest.mark.parametrize("text", ["null", "[1, 2, 3]", '{"models": null}', '{"models": [{"name": 1}]}'])
def test_broken_manifest_on_hot_reload_keeps_the_model(tmp_path: Path, root: Path, text: str) -> None:
    """Hot reload of a broken manifest keeps the last good model and reports the error."""
    shutil.copytree(root / "models", tmp_path / "m")
    reg = ModelRegistry(tmp_path / "m", {"soc": soc_model_expectation()})
    assert reg.poll()
    active = reg.get("soc", "nmc")
    (tmp_path / "m" / "manifest.json").write_text(text)
    assert not reg.poll()
    assert reg.get("soc", "nmc") is active and reg.slot("soc", "nmc").reason == ""
    assert reg.errors and reg.events[-1].startswith("manifest error: manifest.json")


def test_missing_model_directory_is_named_in_the_fallback_reason(tmp_path: Path) -> None:
    """A mistyped --models / model_dir says so, instead of passing for "no model trained"."""
    reg = ModelRegistry(tmp_path / "nope", {"soc": soc_model_expectation()})
    assert not reg.poll()
    assert reg.slot("soc", "nmc").reason == f"no model: model directory not found: {tmp_path / 'nope'}"


def test_retired_model_falls_back_and_a_new_version_replaces_it(tmp_path: Path) -> None:
    """A model the guard keeps refusing is retired: fallback with the reason, never reloaded, v2 still loads."""
    upsert_entry(tmp_path, _trap_entry(tmp_path, "huge"))
    reg = ModelRegistry(tmp_path, {"soc": soc_model_expectation()})
    assert reg.poll()
    model = reg.get("soc", "nmc")
    x = np.full((2, N_FEATURES), 3.7, np.float32)
    for _ in range(3):
        _, verdict = model.run_guarded(x)
    assert model.guard.consecutive_rejected_calls == 3 and not verdict.ok.any()
    assert reg.retire(model, model.guard.last_reason) and not reg.retire(model, "again")
    slot = reg.slot("soc", "nmc")
    assert slot.model is None and slot.reason.startswith("trap_huge@1 retired: trap_huge@1: eta: ")
    (tmp_path / "extra.txt").write_text("directory changed")
    (tmp_path / "touch.json").write_text("{}")
    reg.poll()
    assert reg.get("soc", "nmc") is None                     # the retired file is not loaded again
    e2 = _entry(tmp_path, 2)
    (tmp_path / (e2.file + ".json")).write_text(json.dumps(e2.to_dict()))
    assert reg.poll() and reg.get("soc", "nmc").version == 2


def test_guard_refuses_outputs_that_do_not_line_up_with_the_batch(tmp_path: Path) -> None:
    """Outputs with another row count than the input batch, or rows without values, cannot be matched to cells."""
    res = verify_and_load(tmp_path, _trap_entry(tmp_path, "huge"), soc_model_expectation())
    guard = res.model.guard
    v = guard.check([np.zeros((1, 1)), np.zeros((1, 1))], rows=4)          # one row for four cells
    assert v.ok.tolist() == [False] * 4 and "4 rows" in v.reason
    v = guard.check([np.zeros((3, 0)), np.zeros((3, 1))], rows=3)          # rows without a value
    assert not v.ok.any() and guard.bad_shape == 2
    v = guard.check([np.full((3, 1), 0.5), np.full((3, 1), 0.02)], rows=3)
    assert v.all_ok and v.reason == "" and guard.consecutive_rejected_calls == 0


def test_pipeline_output_contract_names_and_default_ranges(tmp_path: Path) -> None:
    """The SOC pipeline reads eta and sigma: other outputs are refused at load; missing ranges get the pipeline's."""
    e = _entry(tmp_path, 1)                                  # manifest without output ranges
    assert all(s.range is None for s in e.outputs)
    res = verify_and_load(tmp_path, e, soc_model_expectation())
    assert res.model is not None and [s.range for s in res.model.entry.outputs] == [[-2.0, 2.0], [0.0, 1.0]]
    outs, v = res.model.run_guarded(np.full((2, N_FEATURES), 3.7, np.float32))
    assert v.all_ok                                          # sigmoid: inside [-2, 2]
    e.outputs[0].name, e.outputs[1].name = "sigma", "eta"
    res = verify_and_load(tmp_path, e, soc_model_expectation())
    assert res.model is None and "pipeline reads ['eta', 'sigma'] first" in res.reason


@pytest.mark.parametrize("bounds", [[-2.0, 2.0], [None, None], [0.0, None]])
def test_guard_verdicts_per_row_for_every_kind_of_bad_value(bounds: list) -> None:
    """The guard's fast all-inside path and its per-row path agree: NaN and inf are refused under any range,
    values outside a finite range are refused, and only the rows holding them."""
    guard = OutputGuard([TensorSpec("eta", ["batch", 1], range=bounds), TensorSpec("sigma", ["batch", 1])])
    ok = np.full((4, 1), 0.5, np.float32)
    assert guard.check([ok, ok], 4).ok.all()
    for bad, outside in ((np.nan, True), (np.inf, True), (-np.inf, True), (-5.0, bounds[0] is not None),
                         (5.0, bounds[1] is not None)):
        eta = ok.copy()
        eta[2, 0] = bad
        verdict = guard.check([eta, ok], 4)
        assert verdict.ok.tolist() == [True, True, not outside, True], (bad, bounds)
        assert bool(verdict.reason) == outside
    sigma = ok.copy()
    sigma[0, 0] = np.nan   # the unbounded output is still checked for finiteness
    assert guard.check([ok, sigma], 4).ok.tolist() == [False, True, True, True]
