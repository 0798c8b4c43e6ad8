"""`bms-ai` command wiring: subcommands and their defaults, independent of the working directory."""

from __future__ import annotations

from pathlib import Path

from bms_ai.cli import build_parser
from bms_ai.core.paths import share_path
from bms_ai.models.manifest import read_manifest


def test_evaluate_finds_the_shipped_models_from_any_directory(tmp_path, monkeypatch):
    """Without --models, evaluate uses the installed models/ (bms_ai.core.paths), not ./models."""
    monkeypatch.chdir(tmp_path)
    args = build_parser(only="evaluate").parse_args(["evaluate", "drive", "--report", "out"])
    models = Path(args.models)
    assert models.is_absolute() and models == share_path("models")
    entries, errors = read_manifest(models)
    assert entries and not errors
    none = build_parser(only="evaluate").parse_args(["evaluate", "drive", "--report", "out", "--models", "none"])
    assert none.models == "none"
