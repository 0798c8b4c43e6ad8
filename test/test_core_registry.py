"""The one "implementation by name" table: lazy imports, clear errors."""

from __future__ import annotations

import pytest

from bms_ai.core.registry import NotAvailableError, Registry, UnknownNameError


def test_lazy_entry_is_imported_on_first_use_only():
    """A table lists optional parts without importing them (bms-ai decode never loads rclpy)."""
    table: Registry = Registry("thing")
    table.add("json", "json:dumps", "lazy function")
    table.add("obj", len)
    table.add("mod", "json:")
    assert table.names() == ["json", "obj", "mod"] and "json" in table and len(table) == 3
    import json

    assert table.get("json") is json.dumps and table.get("obj") is len and table.get("mod") is json
    assert table.help("json") == "lazy function"


def test_unknown_name_lists_the_choices_in_one_line():
    """A mistyped name is a one-line ValueError that shows what would have worked."""
    table: Registry = Registry("log format")
    table.add(".asc", object)
    with pytest.raises(UnknownNameError, match=r"unknown log format '\.xyz'; known: \.asc"):
        table.get(".xyz")
    with pytest.raises(ValueError):  # a ValueError, so the CLI prints it as one line
        table.check(".xyz")


def test_missing_module_is_not_available_not_a_crash():
    """A missing optional extra is reported as such, not as an ImportError traceback."""
    table: Registry = Registry("backend")
    table.add("gone", "bms_ai.no_such_module:Thing")
    with pytest.raises(NotAvailableError, match="backend 'gone' is not available"):
        table.get("gone")


def test_duplicate_names_are_refused():
    """Two implementations under one name would make the choice silent."""
    table: Registry = Registry("x")
    table.register("a")(object)
    with pytest.raises(ValueError, match="registered twice"):
        table.add("a", object)
