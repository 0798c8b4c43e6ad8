"""Model manifest reading: a malformed document, entry or sidecar is an error message, never an exception."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bms_ai.models.manifest import ModelEntry, TensorSpec, read_manifest


def _good(root: Path) -> dict:
    return json.loads((root / "models" / "manifest.json").read_text())["models"][0]


@pytest.mark.parametrize(("text", "needle"), [
    ("null", "expected an object"),
    ("[1, 2, 3]", "expected an object"),
    ('{"models": null}', "'models' must be a list"),
    ('{"models": {"a": 1}}', "'models' must be a list"),
    ('{"models": [1, "x", null]}', "models[0]: expected an object, got int 1"),
    ("{", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('"\\ud800"', "expected an object"),
])
def test_malformed_manifest_documents_are_errors(tmp_path: Path, text: str, needle: str) -> None:
    """Every shape of broken manifest.json yields no entries and a one-line error naming the file."""
    (tmp_path / "manifest.json").write_text(text)
    entries, errors = read_manifest(tmp_path)
    assert entries == [] and errors and needle in errors[0]
    assert errors[0].startswith("manifest.json") and "\n" not in errors[0]


@pytest.mark.parametrize(("change", "needle"), [
    ({"name": ["x"]}, "models[0].name: expected a non-empty string, got list"),
    ({"version": "2"}, "models[0].version: expected an integer >= 0, got str '2'"),
    ({"version": True}, "models[0].version: expected an integer"),
    ({"file": "../../etc/passwd"}, "models[0].file: expected a path inside the model directory"),
    ({"file": "/abs/model.onnx"}, "models[0].file: expected a path inside"),
    ({"inputs": None}, "models[0].inputs: expected a list of 1..64 tensors"),
    ({"inputs": [{"name": "features", "shape": 10}]}, "models[0].inputs[0].shape: expected a list"),
    ({"inputs": [{"name": "features", "shape": ["batch", -1]}]}, "models[0].inputs[0].shape"),
    ({"outputs": [{"name": "soc", "shape": ["batch", 1], "range": [1, 0]}]}, "models[0].outputs[0].range"),
    ({"outputs": [{"name": "soc", "shape": ["batch", 1], "range": "0..1"}]}, "models[0].outputs[0].range"),
    ({"extra": [1]}, "models[0].extra: expected an object, got list"),
    ({"domain": {"min": [0.0], "max": [1.0]}}, "models[0].domain.min: expected a list of {N} finite numbers"),
    ({"inputs": [{"name": "features", "shape": ["batch", 10], "units": "V"}]}, "models[0].inputs[0].units"),
])
def test_bad_entries_name_the_field_and_keep_the_others(tmp_path: Path, root: Path, change: dict,
                                                        needle: str) -> None:
    """A bad entry is refused with its field named; the good entries of the same file still load."""
    good = _good(root)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "models": [{**good, **change}, good]}))
    entries, errors = read_manifest(tmp_path)
    assert len(entries) == 1 and entries[0].name == good["name"]
    n = len(good["inputs"][0]["names"] or []) or good["inputs"][0]["shape"][-1]
    assert len(errors) == 1 and needle.replace("{N}", str(n)) in errors[0], errors


def test_bad_sidecar_is_an_error(tmp_path: Path, root: Path) -> None:
    """A sidecar that is not an entry costs only itself."""
    shutil.copy(root / "models" / "manifest.json", tmp_path / "manifest.json")
    (tmp_path / "x.onnx.json").write_text("null")
    (tmp_path / "y.onnx.json").write_bytes(b"\xff\xfe")
    entries, errors = read_manifest(tmp_path)
    assert len(entries) == 2
    assert [e.split(":")[0] for e in errors] == ["x.onnx.json", "y.onnx.json"]


def test_entry_round_trip_keeps_output_ranges(root: Path) -> None:
    """The shipped entries declare output ranges; to_dict/from_dict keeps them, specs without one omit the key."""
    e = ModelEntry.from_dict(_good(root))
    assert e.outputs[0].range == [-2.0, 2.0] and e.outputs[0].bounds == (-2.0, 2.0)
    assert ModelEntry.from_dict(e.to_dict()) == e
    assert "range" not in e.to_dict()["inputs"][0]
    assert TensorSpec("x", ["batch", 1], range=[None, 5.0]).bounds == (float("-inf"), 5.0)


# ----------------------------------------------------------------------------- fuzzing (bounded per case)

def _fuzz_settings():
    from hypothesis import HealthCheck, settings
    from testutil import FUZZ_DEADLINE_MS

    return settings(deadline=FUZZ_DEADLINE_MS, suppress_health_check=[HealthCheck.too_slow])


def _checked_read(d: Path):
    from testutil import within_memory

    entries, errors = within_memory(lambda: read_manifest(d))
    assert all(isinstance(e, ModelEntry) for e in entries)
    assert all(isinstance(e, str) and e and "\n" not in e for e in errors)
    return entries, errors


def test_fuzz_manifest_documents(tmp_path_factory):
    """Any JSON document as manifest.json (and as a sidecar): entries or error lines, never an exception."""
    from hypothesis import given
    from hypothesis import strategies as st
    from testutil import json_like

    d = tmp_path_factory.mktemp("fuzz")

    @_fuzz_settings()
    @given(json_like(30), st.one_of(st.none(), json_like(10)))
    def check(doc, side):
        (d / "manifest.json").write_text(json.dumps(doc))
        if side is not None:
            (d / "m.onnx.json").write_text(json.dumps(side))
        _checked_read(d)
        (d / "m.onnx.json").unlink(missing_ok=True)

    check()


def test_fuzz_manifest_entry_fields(tmp_path_factory, root):
    """Any value in any field of a real entry: the entry loads or is refused; a registry polling it never raises."""
    from hypothesis import given
    from hypothesis import strategies as st
    from testutil import json_like

    from bms_ai.models.runtime import ModelRegistry

    d = tmp_path_factory.mktemp("fuzz")
    for f in (root / "models").glob("*.onnx"):
        shutil.copy(f, d / f.name)
    good = _good(root)
    fields = sorted(good) + ["inputs.0", "outputs.0", "outputs.0.range", "inputs.0.shape", "domain.min"]

    def put(entry: dict, path: str, value) -> dict:
        entry = json.loads(json.dumps(entry))
        node, *rest = path.split(".")
        if not rest:
            entry[node] = value
        elif isinstance(entry.get(node), list):
            target = entry[node][int(rest[0])]
            if len(rest) == 1:
                entry[node][int(rest[0])] = value
            else:
                target[rest[1]] = value
        else:
            entry.setdefault(node, {})[rest[0]] = value
        return entry

    @_fuzz_settings()
    @given(st.lists(st.tuples(st.sampled_from(fields), json_like(6)), min_size=1, max_size=3))
    def check(changes):
        entry = good
        for path, value in changes:
            try:
                entry = put(entry, path, value)
            except (TypeError, IndexError, AttributeError, ValueError):  # an earlier change replaced the parent
                continue
        (d / "manifest.json").write_text(json.dumps({"schema": 1, "models": [entry]}))
        entries, errors = _checked_read(d)
        assert len(entries) + len(errors) == 1
        reg = ModelRegistry(d)
        reg.poll()                                   # loads, refuses with a reason, never raises
        assert reg.get(good["task"], good["chemistry"]) is not None or reg.slot(good["task"], good["chemistry"]).reason

    check()
