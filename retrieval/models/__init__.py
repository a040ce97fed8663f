"""Registry of model families: a family is one module here plus one entry below (see ``base.py``)."""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES: dict[str, str] = {
    "bm25": "retrieval.models.bm25",
    "dense": "retrieval.models.dense",
    "dpr": "retrieval.models.dpr",
    "specter2": "retrieval.models.specter2",
    "splade": "retrieval.models.splade",
}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: choose one of {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name])
