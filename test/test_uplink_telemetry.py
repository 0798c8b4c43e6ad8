"""Telemetry chosen by name: disabled sections, unknown kinds (no broker needed)."""

from __future__ import annotations

import pytest

from bms_ai.uplink.telemetry import TELEMETRY, MqttTelemetry, make_telemetry


def test_telemetry_registry_and_disabled_sections() -> None:
    """mqtt is the registered kind; an empty or disabled section means no telemetry at all."""
    assert TELEMETRY.names() == ["mqtt"] and TELEMETRY.get("mqtt") is MqttTelemetry
    assert make_telemetry(None) is None
    assert make_telemetry({}) is None
    assert make_telemetry({"enabled": False, "kind": "nonsense"}) is None


def test_unknown_telemetry_kind_is_one_line_naming_the_choices() -> None:
    """A wrong kind is a one-line ValueError that lists the kinds there are."""
    with pytest.raises(ValueError, match=r"^unknown telemetry kind 'amqp'; known: mqtt$"):
        make_telemetry({"enabled": True, "kind": "amqp"})
