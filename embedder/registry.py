"""Name → implementation registries for connectors and sinks.

Runners find connectors and sinks by name through a ``Registry``; they never import a concrete one.
Built-in implementations are listed by module path and imported on first use, so importing
``embedder`` stays cheap; their module registers them with the decorator, which refuses a second
registration of the same name (as LanceDB's ``@register`` does).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from embedder.errors import UsageError

T = TypeVar("T")


class RegistryError(UsageError, LookupError):
    """An unknown name, or a name registered twice."""


class Registry(Generic[T]):
    """Maps names to classes.

    Args:
        kind: What is registered (``"connector"``, ``"sink"``), used in error messages.
        builtin_modules: ``name → module path`` of implementations imported lazily on lookup.

    Example:
        >>> SINKS = Registry("sink", {"parquet": "indexes.parquet"})
        >>> @SINKS.register("csv")
        ... class CsvSink: ...
    """

    def __init__(self, kind: str, builtin_modules: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._builtin_modules = dict(builtin_modules or {})
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                raise RegistryError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._builtin_modules))

    def get(self, name: str) -> type[T]:
        if name not in self._items and name in self._builtin_modules:
            importlib.import_module(self._builtin_modules[name])
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"Unknown {self.kind} {name!r}. Valid: {', '.join(self.names())}"
            ) from None


def connector_registry():  # noqa: ANN201 - the module ``connectors.registry`` (CONNECTORS, detect_format)
    """The connector registry module (imported on first use: ``embedder`` never imports ``connectors``)."""
    return importlib.import_module("connectors.registry")


def sink_registry():  # noqa: ANN201 - the module ``indexes.registry`` (SINKS, detect_sink)
    """The sink registry module (imported on first use)."""
    return importlib.import_module("indexes.registry")
