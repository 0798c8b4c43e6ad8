"""Layering rules a reviewer would otherwise check by hand: the library runs without ROS, no import cycles."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "bms_ai"
ROS_LAYERS = ("bms_ai.nodes", "bms_ai.ros")  # the only places allowed to import rclpy at import time


def modules() -> list[str]:
    """Every module of the package, dotted."""
    out = []
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def _run_with_blocked(blocked: tuple[str, ...], modules_: list[str], then: str = "") -> str:
    """Import ``modules_`` in a fresh interpreter where importing ``blocked`` fails, run ``then``; stdout."""
    code = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
for m in {modules_!r}:
    importlib.import_module(m)
print("imported", len({modules_!r}))
{then}"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"imported {len(modules_)}" in r.stdout
    return r.stdout


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_library_imports_with_rclpy_blocked():
    """The library runs where ROS is not installed (training machines, the cloud side)."""
    _run_with_blocked(("rclpy", "rosgraph_msgs", "sensor_msgs", "diagnostic_msgs", "builtin_interfaces",
                       "rcl_interfaces", "std_msgs", "launch", "launch_ros"),
                      [m for m in modules() if not m.startswith(ROS_LAYERS)])


@pytest.mark.drive   # ~2 s: outside the fast library tier
def test_vehicle_side_runs_without_the_training_extras():
    """A vehicle installs bms_ai without [train]: its nodes import, and an estimator built on the shipped
    models charges (the charging-feature search runs) with scipy, torch, pybamm, onnx and pyarrow blocked."""
    vehicle = [m for m in modules() if m.startswith(("bms_ai.nodes", "bms_ai.can", "bms_ai.diagnostics",
                                                       "bms_ai.uplink", "bms_ai.models", "bms_ai.graph"))]
    out = _run_with_blocked(("scipy", "torch", "pybamm", "onnx", "pyarrow", "matplotlib", "ray"), vehicle, """
import numpy as np
from bms_ai.estimation.pack import PackEstimator, open_models
est = PackEstimator("lfp", 50.0, open_models(None), initial_soc=0.3)
for k in range(3300):                      # a 0.2 C charge, then a rest closes its segment
    out = est.step(float(k), 10.0 if k < 3000 else 0.0, np.full(4, 3.30 + 1e-5 * min(k, 3000)), np.full(4, 25.0))
print("charged", round(out.soc.soc, 3))
""")
    assert "charged 0.4" in out, out


@functools.cache
def _tree(mod: str) -> ast.Module:
    """Parsed source of a module (parsed once per run: three tests walk every module)."""
    path = PKG.parent / (mod.replace(".", "/") + ".py")
    if not path.is_file():
        path = PKG.parent / mod.replace(".", "/") / "__init__.py"
    return ast.parse(path.read_text())


def _module_imports(mod: str, names: set[str]) -> set[str]:
    """bms_ai modules imported at module level (not inside functions: those are lazy on purpose)."""
    deps = set()
    for node in _tree(mod).body:
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bms_ai"):
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("bms_ai")]
        deps |= {t for t in targets if t in names and t != mod}
    return deps


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_no_import_cycles():
    """Module-level imports form no cycle, so any module can be imported first."""
    names = set(modules())
    graph = {m: _module_imports(m, names) for m in names}
    # a package's __init__ importing its own modules is not a cycle through that package
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if m.startswith(d + "."):
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cyc := visit(d)):
                return cyc
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(names):
        if m not in state and (cyc := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cyc))


# Lower layers never import higher ones (lazy imports inside functions included).
LAYERS: list[set[str]] = [
    {"core"}, {"pack"}, {"chemistry"}, {"can", "models"}, {"sim"}, {"estimation", "diagnostics"},
    {"training", "uplink"}, {"fleet"}, {"graph"}, {"nodes"}, {"ros", "bench"}, {"cli"},
]
# (importer, imported) package pairs still to be moved into the right room; must only shrink.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


@functools.cache
def _all_imports(mod: str) -> frozenset[str]:
    out = set()
    for node in ast.walk(_tree(mod)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bms_ai"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("bms_ai")}
    return frozenset(out)


@pytest.mark.drive   # ~3 s (parses every module): outside the fast library tier
def test_layers_point_downwards():
    """Lower rooms never reach into higher ones, so each room can be tested on its own."""
    layer = {name: i for i, group in enumerate(LAYERS) for name in group}
    found = set()
    for m in modules():
        if m == "bms_ai":
            continue
        src = m.split(".")[1]
        assert src in layer, f"{m}: package '{src}' has no layer in LAYERS"
        for dep in _all_imports(m):
            dst = dep.split(".")[1] if dep.count(".") else dep
            if dst != src and dst in layer and layer[dst] > layer[src]:
                found.add((src, dst))
    assert found <= KNOWN_VIOLATIONS, f"new upward imports: {sorted(found - KNOWN_VIOLATIONS)}"
    assert found == KNOWN_VIOLATIONS, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(KNOWN_VIOLATIONS - found)}"


@pytest.mark.drive   # shares the parse above
def test_no_import_cycles_including_lazy_imports():
    """Even lazy imports do not tie two modules together (the known pairs may only go away)."""
    names = set(modules())
    graph = {m: {d for d in _all_imports(m) if d in names and d != m} for m in names}
    known: set[frozenset[str]] = set()  # pairs still to be split; must only shrink
    found = {frozenset({a, b}) for a in names for b in graph[a] if a in graph.get(b, ())}
    assert found <= known, f"import cycles: {[sorted(c) for c in found - known]}"
    assert found == known, f"fixed, remove from known: {[sorted(c) for c in known - found]}"
