"""Name -> factory registries for methods, models, datasets and samplers.

A registry refuses duplicate names, lists its entries (optionally filtered by a glob) and, when asked
for a name it does not hold, says which names are close (the timm ``create_model`` pattern).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A "did you mean ...?" suffix for error messages ('' when nothing is close).

    Case is ignored (``OUT_DIR`` -> ``out_dir``, ``SGD`` -> ``sgd``); a choice that differs only in case
    is the one suggested."""
    folded: dict[str, str] = {}
    for c in choices:
        folded.setdefault(str(c).lower(), str(c))
    key = str(name).lower()
    if key in folded:
        return f" Did you mean {folded[key]!r}?"
    close = difflib.get_close_matches(key, list(folded), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(folded[c]) for c in close)}?" if close else ""


class Registry(Generic[T]):
    """A named collection of factories (classes or functions)."""

    def __init__(self, kind: str, lazy: dict[str, str] | None = None):
        """``lazy`` maps names to the modules that register them, imported on first use."""
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy = dict(lazy or {})

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or obj.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._entries and name in self._lazy:
            import importlib

            importlib.import_module(self._lazy[name])
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}.{suggest(name, self.names())} "
                f"Known: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(k for k in {**self._lazy, **self._entries} if fnmatch.fnmatch(k, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._lazy

    def __len__(self) -> int:
        return len(set(self._entries) | set(self._lazy))
