"""Model identity: what a model id resolved to (hub revision, hub cache, packaged stand-in, local folder) and the
sha256 of its weights, recorded with every index and trained model so that a number is never produced by a model
other than the one its index was built with.

Resolution is decided per process (hub reachable or not, cache state, installed packages), so it is recorded, not
assumed: ``retrieval.hub.resolve_model`` (and adapter loading) report each resolution to the
:func:`recording_resolutions` blocks open at the time. A family wraps its model loading in one, stores
:meth:`ResolutionLog.identity` in the index, and before searching checks the encoder it loads now against it with
:func:`check_same_encoder`. Only the weights decide sameness: the same weights reached through the hub on one
machine and the hub cache on another are the same model.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

# Weight files that make a model what it is; exported variants (onnx/, openvino/ folders of a hub repo) are left out
# because a hub snapshot holds them only when some process happened to download them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}
EXPORT_FOLDERS = {"onnx", "openvino"}


class ModelMismatch(RuntimeError):
    """An index is searched with an encoder whose weights differ from those it was built with."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(folder: str | Path) -> str | None:
    """sha256 over (relative path, sha256) of every weight file under ``folder``, in path order; None if none."""
    folder = Path(folder)
    files = sorted(
        path for path in folder.rglob("*")
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES and path.name not in NOT_WEIGHTS
        and not EXPORT_FOLDERS & set(path.relative_to(folder).parts[:-1])
    )
    if not files:
        return None
    if len(files) == 1:  # one file: its own sha256, so it reads the same as a pinned or published hash
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


@dataclass
class Resolution:
    """One model (or adapter) as resolved: ``source`` is local | hub | hub-cache | packaged | fresh."""

    ref: str
    source: str
    sha256: str | None = None
    path: str | None = None
    revision: str | None = None
    package: str | None = None
    stand_in: str | None = None
    # For hub downloads the weights arrive only when the model loads: hashed on first use of the record.
    pending: Callable[[], "Resolution"] | None = field(default=None, repr=False)

    def settled(self) -> "Resolution":
        return self.pending() if self.pending else self

    def as_dict(self) -> dict:
        record = self.settled()
        return {key: value for key, value in (
            ("ref", record.ref), ("source", record.source), ("sha256", record.sha256), ("path", record.path),
            ("revision", record.revision), ("package", record.package), ("stand_in", record.stand_in))
            if value is not None}


class ResolutionLog:
    """The resolutions made while a :func:`recording_resolutions` block was open, in order."""

    def __init__(self) -> None:
        self.resolutions: list[Resolution] = []

    def identity(self) -> dict:
        """What to store beside an index or model: ``{"precision", "models": [resolution, ...]}``."""
        from .precision import current_precision

        return {"precision": current_precision(), "models": [r.as_dict() for r in self.resolutions]}


_open_logs: ContextVar[tuple[ResolutionLog, ...]] = ContextVar("open_resolution_logs", default=())


@contextmanager
def recording_resolutions() -> Iterator[ResolutionLog]:
    log = ResolutionLog()
    token = _open_logs.set(_open_logs.get() + (log,))
    try:
        yield log
    finally:
        _open_logs.reset(token)


def record(resolution: Resolution) -> None:
    for log in _open_logs.get():
        log.resolutions.append(resolution)


def local_resolution(ref: str, folder: str | Path) -> Resolution:
    return Resolution(ref=ref, source="local", path=str(Path(folder).resolve()), sha256=weights_digest(folder))


def hub_snapshot_resolution(ref: str, source: str, marker_file: str = "config.json") -> Resolution:
    """A hub id as found in the local hub cache (``source`` hub after a download, hub-cache when offline): the
    snapshot folder's name is the commit, and its weight files are hashed."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, marker_file)
    if not isinstance(cached, str):
        return Resolution(ref=ref, source=source)
    snapshot = Path(cached).parent
    return Resolution(ref=ref, source=source, revision=snapshot.name, path=str(snapshot),
                      sha256=weights_digest(snapshot))


def describe(identity: dict | None) -> str:
    """One line per model: ``ref -> source [package, stand-in] sha256 prefix``; for error messages."""
    if not identity:
        return "(no recorded identity)"
    parts = []
    for model in identity.get("models", []):
        where = model["source"] + (f" {model['package']}" if model.get("package") else "") \
            + (f" revision {model['revision'][:12]}" if model.get("revision") else "") \
            + (" stand-in" if model.get("stand_in") else "")
        parts.append(f"{model['ref']} -> {where}, sha256 {str(model.get('sha256'))[:12]}")
    return "; ".join(parts) or "(no models)"


def _weights(identity: dict) -> list[tuple[str, str | None]]:
    return [(model["ref"], model.get("sha256")) for model in identity.get("models", [])]


def check_same_encoder(recorded: dict | None, current: dict, what: str) -> None:
    """Raise :class:`ModelMismatch` unless ``current`` loads the same weights as ``recorded`` (what built ``what``)."""
    if not recorded or "models" not in recorded:
        raise ModelMismatch(f"{what}: records no model identity (built by an older version of this code): rebuild it")
    if _weights(recorded) != _weights(current):
        raise ModelMismatch(
            f"{what} was built with [{describe(recorded)}] but its encoder now resolves to [{describe(current)}]: "
            "searching it would mix two models. Rebuild the index (e.g. `dvc repro -f index_baseline`), or make the "
            "same weights available (a local folder, the hub cache or the packaged copy)")


def stand_in_used(identity: dict | None) -> bool:
    return any(model.get("stand_in") for model in (identity or {}).get("models", []))


def summary(identity: dict | None) -> dict:
    """A flat, dvc-friendly view for metrics files: source(s), stand-in or not, precision, weights prefix."""
    models = (identity or {}).get("models", [])
    return {
        "source": "+".join(model["source"] for model in models) or "none",
        "stand_in": int(stand_in_used(identity)),
        "precision": (identity or {}).get("precision", "unknown"),
        "backend": _backend_summary((identity or {}).get("backend")),
        "models": ", ".join(f"{m['ref']}@{str(m.get('sha256'))[:12]}" for m in models),
    }


def _backend_summary(record: dict | None) -> str:
    """``torch``, or e.g. ``onnx int8-avx512_vnni`` (the variant names the quantisation and the CPU kernels)."""
    if not record or record.get("backend", "torch") == "torch":
        return "torch"
    return f"{record['backend']} {record.get('variant', record.get('quantize'))}"


def loaded_with_identity(load: Callable[[], object]) -> tuple[object, dict]:
    """``load()``'s model and the identity of everything it resolved (plus the precision in force)."""
    with recording_resolutions() as resolved:
        model = load()
    return model, resolved.identity()


def load_for_index(load: Callable[[], object], index_info: dict, what: str):
    """``load()``'s model, after checking that it resolves to the weights the index records (see
    :func:`check_same_encoder`)."""
    model, identity = loaded_with_identity(load)
    check_same_encoder(index_info.get("encoder_identity"), identity, what)
    return model


def check_same_backend(index_info: dict, current: dict, what: str) -> None:
    """Raise :class:`ModelMismatch` unless queries are encoded by the very export (graph sha256) the documents were:
    an index built on one CPU's int8 variant and searched on another kind of CPU must be rebuilt there."""
    recorded = (index_info.get("encoder_identity") or {}).get("backend") or {"backend": "torch"}
    keys = ("backend", "quantize", "variant", "sha256")
    if any(recorded.get(key) != current.get(key) for key in keys):
        def show(record: dict) -> str:
            return " ".join(str(record[key])[:12] for key in keys if record.get(key))

        raise ModelMismatch(f"{what} was encoded with [{show(recorded)}] but queries would be encoded with "
                            f"[{show(current)}]: rebuild the index on this machine (e.g. `dvc repro -f index_baseline`)")


def index_precision(index_info: dict) -> str:
    """The precision the index's documents were encoded in; queries are encoded in the same one."""
    return (index_info.get("encoder_identity") or {}).get("precision", "fp32")
