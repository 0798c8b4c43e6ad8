"""Shared training helpers: seeding, ONNX export, manifest entries."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import numpy as np

from bms_ai.core.files import sha256_file
from bms_ai.models.manifest import ModelEntry, TensorSpec, read_manifest, upsert_entry


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch and force deterministic kernels (same seed -> same model bytes)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("BMS_AI_TRAIN_THREADS", "1")))


def next_version(out: Path, name: str) -> int:
    """The next free version number for model ``name`` in ``out``."""
    entries, _ = read_manifest(out)
    return 1 + max((e.version for e in entries if e.name == name), default=0)


def data_fingerprint(paths: list[Path]) -> str:
    """SHA-256 over the drive files used, recorded in the model's provenance."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.name).encode())
        for f in sorted(Path(p).glob("*")):
            if f.is_file() and f.suffix in (".npz", ".parquet", ".json"):
                h.update(sha256_file(f).encode())
    return h.hexdigest()


def export_onnx(module, example, out_path: Path, input_names: list[str], output_names: list[str]) -> None:
    """Legacy exporter (dynamo=False) so the batch axis stays dynamic."""
    import torch

    module.eval()
    dyn = {n: {0: "batch"} for n in input_names + output_names}
    with torch.no_grad():
        torch.onnx.export(module, example, str(out_path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dyn, opset_version=17, dynamo=False)


def register(out: Path, *, name: str, version: int, file: str, task: str, chemistry: str,
             inputs: list[TensorSpec], outputs: list[TensorSpec], feature_version: str, normalisation: dict,
             domain: dict, provenance: dict, metrics: dict, params: int, extra: dict | None = None) -> ModelEntry:
    """Hash the exported file and add its entry to the manifest in ``out``."""
    entry = ModelEntry(name=name, version=version, file=file, sha256=sha256_file(out / file), task=task,
                       chemistry=chemistry, inputs=inputs, outputs=outputs, feature_version=feature_version,
                       normalisation=normalisation, domain=domain,
                       provenance=dict(provenance, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                       metrics=metrics, params=params, extra=extra or {})
    upsert_entry(out, entry)
    return entry
