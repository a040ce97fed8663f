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
# Families whose `encode.precision: auto` stays fp32 where the CPU has native bf16 (an explicit bf16 is still taken):
# bf16 token vectors cost ColBERT 0.014 nDCG@10 on SciFact (zero-shot 0.7083 fp32, 0.6940 bf16; README).
FP32_ENCODING_FAMILIES = frozenset({"colbert"})


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: choose one of {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name])
