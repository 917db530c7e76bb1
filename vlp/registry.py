"""One small registry type for everything that grows by name: encoders, objectives, loss strategies.

A new variant is a new class plus ``@REGISTRY.register("name")``; configs pick it by that name, and the
registry-wide tests cover it without a line more. Looking up an unknown name fails with the list of
names that do exist, so a typo in a config is a one-line error.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from vlp.config import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` is used in error messages, e.g. "image encoder")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = entry
            return entry

        return wrap

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
