"""Choosing an implementation by name: one small table type used everywhere.

Modelled on python-can's ``BACKENDS`` table: an entry is either the object
itself or a lazy ``"module:attribute"`` reference (``"module:"`` for the module
itself), imported on first use, so
`bms-ai decode` never imports rclpy or PyBaMM and an optional extra that is
not installed fails only when its entry is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that the table does not hold; the message lists the names it does."""


class NotAvailableError(ImportError):
    """An entry whose module cannot be imported (usually an optional extra that is not installed)."""


UnknownName = UnknownNameError  # the shorter spellings stay importable
NotAvailable = NotAvailableError


@dataclass(frozen=True)
class Entry:
    """One row: the target (object or "module:attr") and a one-line description."""

    target: Any
    help: str = ""


class Registry(Generic[T]):
    """Name -> implementation, with lazy imports and errors that name the choices."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, Entry] = {}
        self._resolved: dict[str, T] = {}

    def add(self, name: str, target: T | str, help: str = "") -> None:
        """Register ``target`` (an object or a lazy "module:attr" string) under ``name``."""
        if name in self._entries:
            raise ValueError(f"{self.what} '{name}' is registered twice")
        self._entries[name] = Entry(target, help)

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """Class or function decorator: ``@SOURCES.register("log")``."""

        def deco(obj: T) -> T:
            self.add(name, obj, help)
            return obj

        return deco

    def check(self, name: str) -> str:
        """``name`` if registered, else UnknownName naming the choices (no import)."""
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.what} '{name}'; known: {', '.join(self.names()) or 'none'}")
        return name

    def get(self, name: str) -> T:
        """The implementation registered as ``name``, imported on first use."""
        if name in self._resolved:
            return self._resolved[name]
        target = self._entries[self.check(name)].target
        if isinstance(target, str) and ":" in target:
            module, _, attr = target.partition(":")
            try:
                mod = importlib.import_module(module)
            except ImportError as exc:
                raise NotAvailableError(f"{self.what} '{name}' is not available: {exc}") from exc
            target = getattr(mod, attr) if attr else mod
        self._resolved[name] = target
        return target

    def help(self, name: str) -> str:
        """The one-line description of ``name`` (no import)."""
        return self._entries[name].help

    def add_subcommands(self, parser, dest: str) -> None:
        """One sub-parser per entry, each filled by its module's ``add_arguments`` (a table of subcommands).

        The entries are modules exposing ``add_arguments(parser)`` and
        ``run(args)``; ``dest`` names the attribute that holds the choice.
        """
        sub = parser.add_subparsers(dest=dest, metavar=dest.upper(), required=True)
        for name in self._entries:
            sp = sub.add_parser(name, help=self.help(name), description=self.help(name))
            self.get(name).add_arguments(sp)

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
