"""Registry of model families: a family is one module here plus one entry below (see ``base.py``)."""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES: dict[str, str] = {
    "bm25": "retrieval.models.bm25",
    "colbert": "retrieval.models.colbert",
    "dense": "retrieval.models.dense",
    "dpr": "retrieval.models.dpr",
    "specter2": "retrieval.models.specter2",
    "splade": "retrieval.models.splade",
}

# Families whose index encoder can run on an ONNX / OpenVINO export (retrieval.encoding); here rather than in the
# family modules so that the export stage does not load (and depend on) a family's code.
EXPORTABLE_FAMILIES = frozenset({"dense"})


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: choose one of {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name])
