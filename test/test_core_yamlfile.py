"""Reading YAML configs is bounded: size, aliases and nesting have limits, each breach is one line."""

from __future__ import annotations

import pytest

from bms_ai.core.yamlfile import MAX_ALIASES, MAX_DEPTH, load_yaml


def _laughs(levels: int = 9) -> str:
    """The classic billion-laughs document: 2 KB of text, 9**levels strings once expanded."""
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    prev = "a"
    for name in "bcdefghij"[:levels - 1]:
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
        prev = name
    return text


def _load(tmp_path, text: str, **kw):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_yaml(p, "test config", **kw)


def test_billion_laughs_is_refused_before_expansion(tmp_path):
    """Too many aliases is a one-line error naming the line, not gigabytes of memory."""
    text = _laughs()
    assert len(text) < 2048
    with pytest.raises(ValueError, match=f"more than {MAX_ALIASES} aliases") as ei:
        _load(tmp_path, text)
    assert "\n" not in str(ei.value) and str(tmp_path) in str(ei.value)


def test_a_few_aliases_still_work(tmp_path):
    """Sharing a block by anchor a few times is ordinary YAML and stays allowed."""
    assert _load(tmp_path, "x: &x {a: 1}\ny: *x\nz: *x\n") == {"x": {"a": 1}, "y": {"a": 1}, "z": {"a": 1}}


@pytest.mark.parametrize("text", ["[" * 600 + "]" * 600, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 200))])
def test_deep_nesting_is_refused(tmp_path, text):
    """Deep nesting is refused before the recursive composer hits the interpreter's stack limit."""
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
        _load(tmp_path, text)


def test_size_limit(tmp_path):
    """A file beyond the size limit is not read into memory."""
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        _load(tmp_path, "a: 1\n" * 40, max_bytes=100)
    assert _load(tmp_path, "a: 1\n" * 10, max_bytes=100) == {"a": 1}


@pytest.mark.parametrize(("text", "needle"), [
    ("a: [1, 2\n", "not valid YAML"),
    ("a: !!python/object/apply:os.system [echo]\n", "not valid YAML"),
    ("a: 2024-13-01\n", "month must be in 1..12"),
    ("a: " + "9" * 5000 + "\n", "not valid YAML"),
    ("? [1, 2]\n: 3\n", "not valid YAML"),
])
def test_bad_documents_are_one_line_errors(tmp_path, text, needle):
    """Syntax errors, unsafe tags and scalars no type can hold: one line naming the file."""
    with pytest.raises(ValueError, match="not valid YAML") as ei:
        _load(tmp_path, text)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_binary_file_is_a_one_line_error(tmp_path):
    """A binary file given by mistake names the file, not a UnicodeDecodeError traceback."""
    p = tmp_path / "c.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_yaml(p, "test config")


def test_fuzz_documents_round_trip_within_limits(tmp_path_factory):
    """Any document a writer produces (no aliases, shallow) reads back equal: the limits refuse only abuse."""
    import math

    import yaml
    from hypothesis import given, settings
    from testutil import FUZZ_DEADLINE_MS, json_like, within_memory

    d = tmp_path_factory.mktemp("fuzz")

    def same(a, b) -> bool:
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
            return math.isnan(b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b and type(a) is type(b)

    @settings(deadline=FUZZ_DEADLINE_MS)
    @given(json_like(30))
    def check(doc):
        p = d / "c.yaml"
        p.write_text(yaml.safe_dump(doc))
        assert same(doc, within_memory(lambda: load_yaml(p, "test config")))

    check()
