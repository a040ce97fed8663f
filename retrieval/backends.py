"""Encoding backends for sentence-transformers models on CPU: PyTorch as loaded, or an ONNX Runtime / OpenVINO
export of the same weights, optionally quantised to int8, through sentence-transformers' own backend support.

An export is made once per (weights, backend, quantisation) into ``cache_dir/<backend>-<variant>-<weights sha256
prefix>/``: a complete sentence-transformers folder (modules, tokenizer, the exported graph) plus ``export.json``
saying what it is. It is written atomically, so a folder that exists is complete, and a later load (or another
experiment sharing a DVC-cached export) reuses it without exporting again.

int8 is dynamic quantisation (no calibration data):
- onnx: ``export_dynamic_quantized_onnx_model`` on the MatMuls with a weight operand (see :func:`onnx_int8_config`),
  with optimum's configuration for the CPU's instructions. With VNNI
  (avx512_vnni, avx_vnni, amx_int8) u8 activations x s8 weights run natively (``avx512_vnni``); without it that
  pair can saturate in the AVX2/AVX512 kernels, so plain x86 gets u8 x u8 weights (``avx2``). The configuration's
  name is part of the file name and the cache key: an export made on one kind of CPU is not reused on another.
- openvino: int8 weight compression (NNCF, data-free); OpenVINO's CPU plugin quantises activations at run time.

ONNX int8 encoders encode one text per call (:func:`encode_batch_size`): dynamic quantisation scales activations
per input tensor, so batching would make a text's vector depend on its batch-mates.

:func:`backend_record` tells what an encoder loaded with :func:`load_sentence_transformer` runs (backend,
quantisation, exported file and its sha256), for an index to record beside its encoder identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from .identity import file_sha256, weights_digest
from .io import atomic_dir, write_json

BACKENDS = ("torch", "onnx", "openvino")
QUANTIZATIONS = ("none", "int8")
# Flags with which u8 x s8 int8 matrix products run natively (VNNI), so no saturation and no reduced range.
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
EXPORT_RECORD = "export.json"
# Raised when the layout of an export folder changes, so that older folders are not mistaken for current ones.
EXPORT_FORMAT = 1
# Attribute under which load_sentence_transformer leaves its record on the model.
_RECORD_ATTRIBUTE = "_retrieval_backend"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from the ``flags`` lines of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    return {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}


def int8_config_name(flags: set[str], machine: str | None = None) -> str:
    """optimum's dynamic-quantisation configuration for this CPU: avx512_vnni | avx2 | arm64."""
    machine = (machine or platform.machine()).lower()
    if machine in {"aarch64", "arm64"}:
        return "arm64"
    if flags & VNNI_FLAGS:
        return "avx512_vnni"
    if "avx2" in flags:
        return "avx2"
    raise ValueError(f"int8 quantisation needs AVX2, VNNI or an ARM64 CPU; this {machine} CPU has none of them "
                     f"(flags: {' '.join(sorted(flags)) or 'unknown'})")


def check_choice(backend: str, quantize: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown encoding backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantisation {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
    if backend == "torch" and quantize != "none":
        raise ValueError(f"quantisation {quantize!r} needs an exported backend (onnx or openvino), not torch")


def export_variant(backend: str, quantize: str, flags: set[str] | None = None) -> str:
    """The variant name of an export: ``fp32``, ``int8-<onnx config>`` (onnx) or ``int8-weights`` (openvino)."""
    check_choice(backend, quantize)
    if quantize == "none":
        return "fp32"
    if backend == "onnx":
        return f"int8-{int8_config_name(cpu_flags() if flags is None else flags)}"
    return "int8-weights"


def default_cache_dir() -> Path:
    return Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval")) / "exports"


def _model_folder(path: str) -> Path:
    """A local folder for ``path``: itself, or its snapshot in the hub cache (downloaded when the hub answers)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    # The weights and configuration only: hub repos also hold onnx/ and openvino/ variants of several hundred MB.
    return Path(snapshot_download(path, ignore_patterns=["onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot"]))


def _files_digest(folder: Path, files: list[str]) -> str:
    """sha256 of one file; for several (OpenVINO's .xml + .bin), sha256 over (name, sha256) lines in order."""
    if len(files) == 1:
        return file_sha256(folder / files[0])
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}\0{file_sha256(folder / name)}\n".encode())
    return digest.hexdigest()


def export_folder(path: str, *, backend: str, quantize: str = "none", cache_dir: Path | None = None,
                  search_dirs: tuple[Path, ...] = ()) -> Path:
    """The export folder of the model at ``path`` for (backend, quantize), exporting it into ``cache_dir`` first
    unless it is there or in one of ``search_dirs`` (read-only folders of ready exports, e.g. a DVC output).
    Its name is ``<backend>-<variant>-<weights sha256 prefix>``."""
    variant = export_variant(backend, quantize)
    if backend == "torch":
        raise ValueError("the torch backend loads the model folder itself: there is nothing to export")
    source = _model_folder(path)
    weights = weights_digest(source)
    if weights is None:
        raise ValueError(f"{source}: no weight files (*.safetensors, *.bin) to export")
    name = f"{backend}-{variant}-{weights[:16]}"
    for folder in (*search_dirs, Path(cache_dir or default_cache_dir())):
        record = _read_record(folder / name)
        if record is not None and record.get("format") == EXPORT_FORMAT and record.get("weights_sha256") == weights:
            return folder / name
    target = Path(cache_dir or default_cache_dir()) / name
    with atomic_dir(target) as tmp:
        files = _export(source, tmp, backend, variant)
        write_json({"format": EXPORT_FORMAT, "backend": backend, "quantize": quantize, "variant": variant,
                    "files": files, "sha256": _files_digest(tmp, files), "weights_sha256": weights,
                    "versions": _versions(backend)}, tmp / EXPORT_RECORD)
    return target


def _read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / EXPORT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _versions(backend: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    packages = ["sentence-transformers", "optimum", "optimum-onnx", "onnxruntime"] if backend == "onnx" \
        else ["sentence-transformers", "optimum", "optimum-intel", "openvino", "nncf"]
    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def activation_matmuls(graph) -> list[str]:
    """Names of the MatMul nodes of an ONNX graph with no constant (initializer) input: attention's query x key and
    weights x value products, whose both operands are activations. Dynamic int8 on those costs the most accuracy
    (measured on all-MiniLM-L6-v2, SciFact: min cosine to fp32 0.980 with them, 0.992 without) for little speed."""
    constants = {initializer.name for initializer in graph.initializer}
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and not any(name in constants for name in node.input)]


def onnx_int8_config(onnx_file: Path, config_name: str):
    """optimum's dynamic int8 configuration ``config_name`` restricted to the MatMuls with a weight operand
    (optimum quantises every MatMul, the embedding Gather and Transposes by default)."""
    import onnx
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    excluded = activation_matmuls(onnx.load(str(onnx_file), load_external_data=False).graph)
    return getattr(AutoQuantizationConfig, config_name)(is_static=False, operators_to_quantize=["MatMul"],
                                                        nodes_to_exclude=excluded)


def _export(source: Path, out: Path, backend: str, variant: str) -> list[str]:
    """Write the sentence-transformers folder of the export into ``out``; return the graph file(s) to load."""
    import logging

    from sentence_transformers import SentenceTransformer

    # sentence-transformers warns after every export that the model should be saved: this is what saves it.
    logging.getLogger("sentence_transformers.backend.utils").setLevel(logging.ERROR)
    model = SentenceTransformer(str(source), device="cpu", backend=backend, model_kwargs={"export": True})
    model.save(str(out))
    if backend == "onnx":
        if variant == "fp32":
            return ["onnx/model.onnx"]
        from sentence_transformers.backend import export_dynamic_quantized_onnx_model

        config_name = variant.removeprefix("int8-")
        config = onnx_int8_config(out / "onnx" / "model.onnx", config_name)
        # Named after the weight type and the CPU configuration, e.g. model_qint8_avx512_vnni.onnx.
        suffix = f"{config.weights_dtype.name.lower()}_{config_name}"
        export_dynamic_quantized_onnx_model(model, config, str(out), file_suffix=suffix)
        (out / "onnx" / "model.onnx").unlink()  # only the int8 graph is loaded from this folder
        return [f"onnx/model_{suffix}.onnx"]
    if variant == "fp32":
        return ["openvino/openvino_model.xml", "openvino/openvino_model.bin"]
    import nncf
    import openvino

    compressed = nncf.compress_weights(model[0].auto_model.model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    openvino.save_model(compressed, out / "openvino" / "openvino_model_qint8_weights.xml")
    for suffix in (".xml", ".bin"):
        (out / "openvino" / f"openvino_model{suffix}").unlink()
    return ["openvino/openvino_model_qint8_weights.xml", "openvino/openvino_model_qint8_weights.bin"]


def _runtime_model_kwargs(backend: str, threads: int | None, given: dict | None) -> tuple[dict, dict]:
    """model_kwargs for the runtime (thread count; OpenVINO in fp32 unless told otherwise) and what to record."""
    given = dict(given or {})
    if backend == "onnx":
        import onnxruntime

        options = given.pop("session_options", None) or onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        return {"session_options": options, **given}, {"threads": options.intra_op_num_threads or "default"}
    # OpenVINO runs in bf16 by default on CPUs with native bf16: fp32 is asked for, so the export's precision does
    # not depend on the machine; pass ov_config={"INFERENCE_PRECISION_HINT": "bf16"} to choose bf16.
    ov_config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": str(threads)} if threads else {}),
                 **(given.pop("ov_config", None) or {})}
    return {"ov_config": ov_config, **given}, {"ov_config": ov_config}


def load_sentence_transformer(path: str, *, backend: str = "torch", quantize: str = "none",
                              cache_dir: Path | None = None, search_dirs: tuple[Path, ...] = (),
                              threads: int | None = None, **kwargs: Any):
    """A SentenceTransformer for the model at ``path`` (a local folder, e.g. ``resolve_model(ref)``, or a hub id)
    running on ``backend`` (torch | onnx | openvino) with ``quantize`` (none | int8).

    onnx and openvino load the export cached in ``cache_dir`` (default ``$RETRIEVAL_CACHE/exports``), exporting it
    first when missing (``search_dirs``: folders of ready exports looked in first). ``threads`` sets the ONNX
    Runtime / OpenVINO thread count (torch's is process-wide:
    ``torch.set_num_threads``). Other keyword arguments go to ``SentenceTransformer`` (``device``, ``model_kwargs``...).
    """
    check_choice(backend, quantize)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive number of threads, got {threads!r}")
    from sentence_transformers import SentenceTransformer

    if backend == "torch":
        model = SentenceTransformer(path, **kwargs)
        record = {"backend": "torch", "quantize": "none", "variant": "fp32", "file": None, "sha256": None}
    else:
        folder = export_folder(path, backend=backend, quantize=quantize, cache_dir=cache_dir, search_dirs=search_dirs)
        export = _read_record(folder)
        model_kwargs, runtime = _runtime_model_kwargs(backend, threads, kwargs.pop("model_kwargs", None))
        model = SentenceTransformer(str(folder), backend=backend, device=kwargs.pop("device", "cpu"),
                                    model_kwargs={"file_name": export["files"][0], **model_kwargs}, **kwargs)
        record = {"backend": backend, "quantize": quantize, "variant": export["variant"], "file": export["files"][0],
                  "sha256": export["sha256"], "export_dir": str(folder), **runtime}
    setattr(model, _RECORD_ATTRIBUTE, record)
    return model


def per_text_batches(model) -> bool:
    """Whether ``model`` must encode one text per call for a text's vector to depend on that text alone.

    ONNX int8 is dynamic quantisation: DynamicQuantizeLinear takes one activation scale per input tensor, i.e. per
    batch, padding included, so in a batch a text's vector moves with its batch-mates (all-MiniLM-L6-v2, SciFact
    claims in batches of 32: up to 0.012 of cosine, benchmarks/int8_batch_invariance.py). One text per call gives
    each text its own scale, and was faster too (no padding). OpenVINO int8 compresses weights only: its vectors do
    not move with the batch (measured: differences of 3e-8, as in fp32), so it keeps its batches."""
    try:
        record = backend_record(model)
    except ValueError:
        return False
    return record["backend"] == "onnx" and record["quantize"] == "int8"


def encode_batch_size(model, requested: int) -> int:
    """The batch size ``model`` encodes with: ``requested``, or 1 where batching would change vectors
    (:func:`per_text_batches`)."""
    return 1 if per_text_batches(model) else int(requested)


def backend_record(model) -> dict:
    """What ``model`` encodes with: backend, quantize, variant, exported file and its sha256 (None for torch)."""
    record = getattr(model, _RECORD_ATTRIBUTE, None)
    if record is None:
        raise ValueError("this model was not loaded with retrieval.backends.load_sentence_transformer: "
                         "its backend is not recorded")
    return dict(record)
