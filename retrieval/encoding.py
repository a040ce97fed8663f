"""How a family encodes at index, search and validation time: the backend (PyTorch as loaded, or an ONNX Runtime /
OpenVINO export, optionally int8), and for PyTorch the autocast precision. Read from params ``encode``.

``auto`` picks from measurement (README, benchmarks/encode_speed.py): on a CPU, an ONNX int8 export encodes SciFact
2.7x faster than PyTorch fp32 with nDCG@10 within 0.002; on a CUDA device PyTorch in bf16/fp16 is the fast path, so
``auto`` keeps torch there. Families that cannot be exported (not in ``retrieval.models.EXPORTABLE_FAMILIES``)
always encode with torch under ``auto``; asking for an export for them is an error.

The settings in force are contextual (:func:`using_encoding`), like the precision they include, so the family
functions keep their ``(model_ref, corpus, index_dir, config)`` signatures."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from .precision import PRECISIONS, inference_precision, resolve_precision

BACKEND_CHOICES = ("auto", "torch", "onnx", "openvino")
QUANTIZE_CHOICES = ("auto", "none", "int8")
SETTINGS = ("precision", "backend", "quantize")


@dataclass(frozen=True)
class Encoding:
    """Resolved encoding settings: ``backend`` torch | onnx | openvino, ``quantize`` none | int8 (exports only),
    ``precision`` fp32 | bf16 (torch autocast; fp32 for exports, which run in their own), and ``export_dirs``:
    folders holding ready exports (a DVC output) that are searched before the user cache, which is where new exports
    are written."""

    backend: str = "torch"
    quantize: str = "none"
    precision: str = "fp32"
    export_dirs: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def exported(self) -> bool:
        return self.backend != "torch"

    def describe(self) -> str:
        return f"{self.backend} {self.quantize}" if self.exported else f"torch {self.precision}"


def encoding_from_params(settings: Mapping | None, *, exportable: bool, cuda: bool | None = None,
                         export_dirs: tuple[Path, ...] = (), bf16_when_auto: bool = True) -> Encoding:
    """The params section ``encode`` resolved for a family (``exportable``: whether it can run on an export;
    ``bf16_when_auto`` False: precision ``auto`` means fp32 even where bf16 is native).

    An unknown key or value is an error naming ``encode.<key>``: a typo would otherwise encode with the default."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown {', '.join(f'encode.{key}' for key in unknown)}: the encoding settings are "
                         f"{', '.join(SETTINGS)}")
    backend, quantize = str(settings.get("backend", "auto")), str(settings.get("quantize", "auto"))
    precision = str(settings.get("precision", "auto"))
    for key, value, choices in (("backend", backend, BACKEND_CHOICES), ("quantize", quantize, QUANTIZE_CHOICES),
                                ("precision", precision, PRECISIONS)):
        if value not in choices:
            raise ValueError(f"encode.{key}: unknown value {value!r}; use one of {', '.join(choices)}")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "onnx" if exportable and not cuda else "torch"
    elif backend != "torch" and not exportable:
        raise ValueError(f"encode.backend {backend}: this model family encodes with torch only (set encode.backend "
                         "to auto or torch)")
    if backend == "torch":
        if quantize == "int8":
            raise ValueError("encode.quantize int8 needs an exported backend (encode.backend onnx or openvino)")
        quantize = "none"
    elif quantize == "auto":
        quantize = "int8"
    if precision == "auto" and not bf16_when_auto:
        precision = "fp32"
    # An export runs in its own precision (fp32 graph, or int8 weights): torch autocast stays off around it.
    return Encoding(backend=backend, quantize=quantize,
                    precision="fp32" if backend != "torch" else resolve_precision(precision),
                    export_dirs=tuple(Path(d) for d in export_dirs))


_current: ContextVar[Encoding] = ContextVar("encoding", default=Encoding())


def current_encoding() -> Encoding:
    return _current.get()


@contextmanager
def using_encoding(encoding: Encoding) -> Iterator[Encoding]:
    """``encoding`` in force for the block, with its torch precision (queries of an index are encoded as it was)."""
    token = _current.set(encoding)
    try:
        with inference_precision(encoding.precision):
            yield encoding
    finally:
        _current.reset(token)


def index_encoding(index_info: Mapping) -> Encoding:
    """The encoding an index's documents were encoded with (its ``encoder_identity``), for its queries; exports are
    looked for where the encoding in force looks."""
    identity = index_info.get("encoder_identity") or {}
    backend = identity.get("backend") or {"backend": "torch"}
    return Encoding(backend=backend["backend"], quantize=backend.get("quantize", "none"),
                    precision=identity.get("precision", "fp32"), export_dirs=current_encoding().export_dirs)
