"""Every name ``data.name`` accepts, read from the registries that hold them, and what ``mentor data info`` says.

A recipe's data is a named dataset (:data:`~mentor.data.sources.DATASETS`: files found on disk or
fetched), a domain set (:data:`~mentor.data.domains.DOMAIN_SETS`: generated, or a user's folders) or a
user's image-folder tree (:data:`~mentor.data.folders.FOLDER_DATASETS`). Listing them from the registries
means a newly registered name cannot be left out of ``mentor list datasets``.
"""

from __future__ import annotations

import fnmatch

from mentor.data.domains import DOMAIN_SETS, list_domain_sets
from mentor.data.errors import DataError
from mentor.data.folders import FOLDER_DATASETS
from mentor.data.sources import DATASETS, ENV_VAR, get_source
from mentor.registry import Registry, suggest


def dataset_registries() -> dict[str, Registry]:
    """The registries of recipe data names, by kind: ``dataset``, ``domain set``, ``image folder``."""
    list_domain_sets()  # imports the modules that register the built-in domain sets
    return {"dataset": DATASETS, "domain set": DOMAIN_SETS, "image folder": FOLDER_DATASETS}


def dataset_names(pattern: str = "*") -> list[str]:
    """Every name ``data.name`` accepts (optionally filtered by a glob), sorted."""
    names = {n for reg in dataset_registries().values() for n in reg.names()}
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def describe_dataset(name: str) -> tuple[str, bool]:
    """(what ``mentor data info NAME`` prints, whether the data is there to train on).

    A named dataset says where each split was found or where it was looked for; the second value is
    False when a split is missing. A domain set or an image-folder dataset is described (its files are
    the user's, named by ``data.root``). An unknown name is a DataError with the near names."""
    registries = dataset_registries()
    if name in DATASETS:
        source = get_source(name)
        return source.info(), source.available()
    if name in FOLDER_DATASETS:
        return (f"{name}: your own images, one sub-folder per class, read by a recipe with data.name={name} "
                f"data.root=DIR: DIR/train/<class>/* and DIR/test/<class>/* (or data.root=TRAIN "
                "data.test_root=TEST), resized to data.image_size with data.channels 1 or 3; data.stream=true "
                "decodes them in DataLoader workers instead of holding them on the device"), True
    if name in DOMAIN_SETS:
        about = _first_paragraph(DOMAIN_SETS.get(name).__doc__) or "a domain set"
        return (f"{name}: a domain set (data.name={name} with data.test_domains=[...]; or mentor adapt --shift "
                f"{name}). {about}"), True
    known = sorted({n for reg in registries.values() for n in reg.names()})
    raise DataError(f"unknown dataset {name!r}.{suggest(name, known)} Known: {', '.join(known)}")


def missing_hint(name: str) -> str:
    """The line ``mentor data info`` adds when a dataset is missing."""
    return (f"{name} is not on this machine: get it as listed above, then point a recipe at it with data.root=DIR "
            f"(or set ${ENV_VAR}=DIR)")


__all__ = ["dataset_names", "dataset_registries", "describe_dataset", "missing_hint"]
