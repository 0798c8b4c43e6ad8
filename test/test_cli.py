"""`bms-ai` command wiring: subcommands and their defaults, independent of the working directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from bms_ai.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["decode", "x.blf", "--rate", "0"], "--rate: must be > 0"),
    (["decode", "x.blf", "--rate", "inf"], "--rate: must be finite"),
    (["decode", "x.blf", "--max-age", "nan"], "--max-age: must be finite"),
    (["replay", "x.blf", "--start-delay", "1e999"], "--start-delay: must be finite"),
    (["evaluate", "d", "--report", "r", "--rate-hz", "-1"], "--rate-hz: must be >= 0"),
    (["evaluate", "d", "--report", "r", "--jobs", "0"], "--jobs: must be >= 1"),
    (["ingest-server", "--port", "99999"], "--port: must be a port"),
    (["replay", "x.blf", "--speed", "1e-308"], "--speed: must be 0 (as fast as possible) or >= 0.01"),   # never ends
    (["demo", "--speed", "nan"], "--speed: must be finite"),
    (["demo", "--timeout", "-1"], "--timeout: must be > 0"),
    (["evaluate", "d", "--report", ""], "--report: must name a directory"),    # '' wrote into the working directory
    (["fleet", "demo", "--out", " "], "--out: must name a directory"),
    (["train", "rul", "--out", ""], "--out: must name a directory"),
])
def test_out_of_range_numbers_are_a_usage_error(argv, says, capsys) -> None:
    """nan, inf and out-of-range values are refused where the option is read, in one line (argparse's exit 2)."""
    with pytest.raises(SystemExit) as ex:
        _run(argv, capsys)
    err = capsys.readouterr().err
    assert ex.value.code == 2 and says in err and "Traceback" not in err


def test_bad_files_end_in_one_line_not_a_traceback(tmp_path, capsys) -> None:
    """A drive whose meta.json is not an object, an output path that is a directory, a null scenario."""
    drive = tmp_path / "drive"
    drive.mkdir()
    shutil.copy(share_path("data", "drives", "nmc_udds", "truth.parquet"), drive)
    (drive / "meta.json").write_text("null")
    (tmp_path / "null.json").write_text("null")
    for argv, says in ((["evaluate", str(drive), "--report", str(tmp_path / "r"), "--no-plots"],
                        "meta.json: drive metadata must be a JSON object"),
                       (["bench", "--quick", "--only", "decode", "-o", str(tmp_path)], "is a directory, not a file"),
                       (["simulate", "--scenario", str(tmp_path / "null.json"), "--out", str(tmp_path / "o")],
                        "a scenario must be a JSON object")):
        code, err = _run(argv, capsys)
        assert code == 1 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_an_unexpected_error_is_one_line_unless_debugging(monkeypatch, capsys) -> None:
    """What no handler expected still ends in one line; BMS_AI_DEBUG=1 gives the traceback instead."""
    from bms_ai import cli

    def boom(_args) -> int:
        raise KeyError("surprise")

    module = type("M", (), {"run": staticmethod(boom), "add_arguments": staticmethod(lambda p: None)})
    monkeypatch.setattr(cli.COMMANDS, "get", lambda name: module)
    code, err = _run(["bench"], capsys)
    assert code == 1 and err.strip() == "bms-ai bench: error: KeyError: 'surprise' (BMS_AI_DEBUG=1 shows where)"
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(KeyError):
        cli.main(["bench"])


@pytest.mark.parametrize("argv, says", [
    (["train", "rul", "--data", "drives"], "train rul: --data is not used"),     # was silently ignored
    (["train", "soh", "--data", "a", "b"], "train soh: --data takes one directory"),   # the second was ignored
])
def test_training_options_a_task_would_ignore_are_refused(argv, says, capsys) -> None:
    """An option the task does not read is an error, not silently dropped."""
    code, err = _run(argv, capsys)
    assert code != 0 and says in err and "Traceback" not in err and err.count("\n") == 1


def test_fleet_ingest_of_a_missing_store_folder_is_an_error(tmp_path, capsys) -> None:
    """A typo in --store is not an empty fleet (it printed 0 segments and exited 0)."""
    code, err = _run(["fleet", "ingest", "--store", str(tmp_path / "nowhere"), "--quiet"], capsys)
    assert code == 2 and "store folder" in err and "not found" in err


def test_number_option_types_refuse_what_would_break_the_work() -> None:
    """The types behind the options: finite, in range, or argparse's one-line error."""
    import argparse

    from bms_ai.core import cliargs

    ok = [(cliargs.positive_float, "0.5", 0.5), (cliargs.nonneg_float, "0", 0.0), (cliargs.unit_float, "1", 1.0),
          (cliargs.positive_int, "3", 3), (cliargs.nonneg_int, "0", 0), (cliargs.port, "0", 0), (cliargs.port, "65535", 65535),
          (cliargs.replay_speed, "0", 0.0), (cliargs.replay_speed, "0.01", 0.01), (cliargs.out_dir, "out", "out")]
    for fn, text, want in ok:
        assert fn(text) == want
    bad = [(cliargs.positive_float, "0"), (cliargs.positive_float, "inf"), (cliargs.nonneg_float, "nan"),
           (cliargs.nonneg_float, "-1"), (cliargs.unit_float, "1.5"), (cliargs.unit_float, "nan"),
           (cliargs.positive_int, "0"), (cliargs.positive_int, "2.5"), (cliargs.nonneg_int, "-1"), (cliargs.port, "65536"), (cliargs.port, "x"),
           (cliargs.replay_speed, "0.001"), (cliargs.replay_speed, "-1"), (cliargs.out_dir, ""), (cliargs.out_dir, "  ")]
    for fn, text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)
