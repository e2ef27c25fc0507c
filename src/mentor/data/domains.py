"""Datasets made of named domains: the shifted data that generalisation and adaptation are measured on.

A :class:`DomainSet` is an ordered mapping from a domain name to an :class:`ArrayDataset`; every
domain shares the class list, the image shape and the normalisation constants. The same type serves
domain generalisation (each domain a source or a held-out target: ``rotated_fmnist``,
``digits_domains``, users' PACS or Office-Home folders) and adaptation (each domain one test stream:
``fmnist_c`` as ``<corruption>-<severity>``, users' CIFAR-10-C folders).

Domain sets are registered by name in :data:`DOMAIN_SETS` as loader functions
``fn(root: str | None = None, **options) -> DomainSet``; :func:`load_domains` looks one up with a
near-match suggestion for a mistyped name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mentor.data.errors import DataError
from mentor.data.readers import ArrayDataset
from mentor.registry import Registry, suggest

DOMAIN_SETS: Registry[Callable[..., DomainSet]] = Registry("domain set")


@dataclass
class DomainSet:
    """Named domains of one labelled dataset, in a fixed order, sharing classes, shape and statistics."""

    name: str
    domains: dict[str, ArrayDataset]

    def __post_init__(self) -> None:
        if not self.domains:
            raise DataError(f"{self.name}: a domain set needs at least one domain")
        first = next(iter(self.domains.values()))
        for d, ds in self.domains.items():
            if ds.image_shape != first.image_shape or ds.num_classes != first.num_classes:
                raise DataError(f"{self.name}: domain {d!r} has {ds.num_classes} classes of shape "
                                f"{ds.image_shape}, the others {first.num_classes} of {first.image_shape}")

    def names(self) -> list[str]:
        return list(self.domains)

    @property
    def first(self) -> ArrayDataset:
        return next(iter(self.domains.values()))

    @property
    def classes(self) -> list[str]:
        return list(self.first.classes)

    @property
    def num_classes(self) -> int:
        return self.first.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.first.image_shape

    def check_names(self, names: Iterable[Any], key: str = "domains") -> list[str]:
        """``names`` as strings, each a domain of this set (a clear error with a near match if not)."""
        out = []
        for n in names:
            n = str(n)
            if n not in self.domains:
                raise DataError(f"{key}: {self.name} has no domain {n!r}.{suggest(n, self.names())} "
                                f"Its domains: {', '.join(self.names())}")
            out.append(n)
        return out

    def select(self, names: Iterable[Any], key: str = "domains") -> DomainSet:
        """The same set restricted to ``names`` (in the order given)."""
        return DomainSet(self.name, {n: self.domains[n] for n in self.check_names(names, key)})


def register_domains(name: str):
    """Register a loader ``fn(root=None, **options) -> DomainSet`` under ``name``."""
    return DOMAIN_SETS.register(name)


def list_domain_sets(pattern: str = "*") -> list[str]:
    _load_builtin()
    return DOMAIN_SETS.names(pattern)


def is_domain_set(name: str) -> bool:
    _load_builtin()
    return name in DOMAIN_SETS


def load_domains(name: str, root: str | None = None, **options: Any) -> DomainSet:
    """A registered domain set by name; ``root`` is where users' files are (ignored by generated sets)."""
    _load_builtin()
    if name not in DOMAIN_SETS:
        raise DataError(f"unknown domain set or shift {name!r}.{suggest(name, DOMAIN_SETS.names())} "
                        f"Known: {', '.join(DOMAIN_SETS.names())}")
    return DOMAIN_SETS.get(name)(root=root, **options)


def _load_builtin() -> None:
    """Import the modules that register the built-in domain sets (one explicit list)."""
    import importlib

    for module in _BUILTIN:
        importlib.import_module(module)


# The modules that register domain sets with @register_domains.
_BUILTIN = (
    "mentor.data.corruptions",      # fmnist_c, cifar10_c, cifar100_c
    "mentor.data.shifted",          # rotated_fmnist, digits_domains, domain_folder, domain_list
)
