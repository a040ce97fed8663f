"""Document embeddings computed once per (exported encoder, texts, encoding settings) and reused.

The train stage's validation pass encodes the whole corpus with the model of each epoch, through the same export
the index stage will load; index_finetuned then finds the kept epoch's embeddings here instead of encoding the
corpus a second time (and train finds the baseline index's embeddings for the base model's score).

Entries live in ``$RETRIEVAL_CACHE/embeddings`` (default ``~/.cache/retrieval/embeddings``), outside DVC: an entry
is named by the sha256 of everything that determines it (the exported graph's sha256, the encoding settings, every
text in order), so a hit is the very computation that would otherwise run, and a miss only costs time. Only
exported encoders are cached: their graph file is a stable identity, while a PyTorch model in training is not
(its weights change in place). Entries are written atomically (temp file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .io import atomic_path

# Raised when what an entry holds changes, so older entries are not read as current ones.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval")) / "embeddings"


def entry_key(encoder: Mapping, texts: Sequence[str]) -> str:
    """sha256 over the encoder's description (exported file sha256, max length, normalisation...) and the texts."""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "encoder": dict(encoder)}, sort_keys=True).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def cached_embeddings(encoder: Mapping | None, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray], *,
                      cache_dir: Path | None = None) -> np.ndarray:
    """``compute(texts)``, or the stored result of the same computation. ``encoder`` None: not cacheable, computed."""
    if encoder is None:
        return compute(list(texts))
    path = Path(cache_dir or default_cache_dir()) / f"{entry_key(encoder, texts)}.npy"
    try:
        stored = np.load(path, allow_pickle=False)
        if stored.shape[0] == len(texts):
            return stored
    except (OSError, ValueError):
        pass  # absent or unreadable: computed again and rewritten
    embeddings = np.ascontiguousarray(compute(list(texts)), dtype=np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:
            np.save(stream, embeddings, allow_pickle=False)
    return embeddings
