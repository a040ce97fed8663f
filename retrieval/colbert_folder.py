"""PyLate's folder layout for a ColBERT model, read and written without PyLate or the colbert family.

Why a module of its own: ``retrieval.onnx_import`` writes the packaged answerai-colbert-small-v1 stand-in in this
layout, and the hub resolver (which every family loads) reaches the converters; importing the family there would put
``retrieval/models/colbert.py`` and PyLate into every family's stage dependencies.

The layout (as ``pylate.models.ColBERT.save`` writes it): the transformer body and its tokenizer at the top
(``modules.json`` module 0, path ""), the bias-free projection in ``1_Dense/`` (``linear.weight`` in
``model.safetensors``, ``config.json``), and the token settings in ``config_sentence_transformers.json``."""

from __future__ import annotations

import json
import os
import string
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .io import atomic_dir, write_json

DENSE_FOLDER = "1_Dense"


@dataclass(frozen=True)
class ColBERTSettings:
    """How texts become token sequences: PyLate's ``config_sentence_transformers.json`` fields (PyLate's defaults)."""

    query_prefix: str = "[Q] "
    document_prefix: str = "[D] "
    query_length: int = 32
    document_length: int = 180
    do_query_expansion: bool = True
    attend_to_expansion_tokens: bool = False
    skiplist_words: tuple[str, ...] = field(default_factory=lambda: tuple(string.punctuation))

    def __post_init__(self) -> None:
        for name in ("query_length", "document_length"):
            if int(getattr(self, name)) < 3:
                raise ValueError(f"colbert {name} must be at least 3 tokens ([CLS], prefix, [SEP]), "
                                 f"got {getattr(self, name)!r}")


def is_colbert_folder(folder: str | os.PathLike) -> bool:
    """A folder in this layout: ``modules.json`` naming a Dense module."""
    modules = Path(folder) / "modules.json"
    return modules.is_file() and any(str(module.get("type", "")).endswith("Dense")
                                     for module in json.loads(modules.read_text(encoding="utf-8")))


def read_settings(folder: str | os.PathLike) -> ColBERTSettings:
    """The folder's token settings; PyLate's defaults for what it does not say (or for a folder without any)."""
    settings = ColBERTSettings()
    stored = Path(folder) / "config_sentence_transformers.json"
    if not stored.is_file():
        return settings
    values = json.loads(stored.read_text(encoding="utf-8"))
    known = {key: values[key] for key in asdict(settings) if values.get(key) is not None}
    if "skiplist_words" in known:
        known["skiplist_words"] = tuple(known["skiplist_words"])
    return replace(settings, **known)


def write_colbert_folder(folder: str | os.PathLike, body, tokenizer, projection_weight,
                         settings: ColBERTSettings) -> None:
    """Write a ColBERT model into the existing folder ``folder``: ``body`` (a transformers model), its tokenizer, a
    ``[out, in]`` projection weight (a torch tensor) and the token settings."""
    from safetensors.torch import save_file

    folder = Path(folder)
    body.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    dense = folder / DENSE_FOLDER
    dense.mkdir(exist_ok=True)
    weight = projection_weight.detach().cpu().float().contiguous()
    save_file({"linear.weight": weight}, str(dense / "model.safetensors"))
    write_json({"in_features": int(weight.shape[1]), "out_features": int(weight.shape[0]), "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False},
               dense / "config.json")
    write_json([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": DENSE_FOLDER, "type": "pylate.models.Dense.Dense"}],
               folder / "modules.json")
    write_json({"max_seq_length": settings.document_length, "do_lower_case": False},
               folder / "sentence_bert_config.json")
    write_json({"model_type": "ColBERT", "similarity_fn_name": "MaxSim", "prompts": {}, "default_prompt_name": None,
                **{**asdict(settings), "skiplist_words": list(settings.skiplist_words)}},
               folder / "config_sentence_transformers.json")


def save_colbert_folder(out_dir: str | os.PathLike, body, tokenizer, projection_weight,
                        settings: ColBERTSettings) -> str:
    """:func:`write_colbert_folder` into ``out_dir``, atomically (a failed write leaves no half folder); return it."""
    with atomic_dir(out_dir) as tmp:
        write_colbert_folder(tmp, body, tokenizer, projection_weight, settings)
    return os.fspath(out_dir)


def projection_weight(folder: str | os.PathLike):
    """The ``[out, in]`` projection weight of a folder in this layout (a torch tensor)."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / DENSE_FOLDER / "model.safetensors"))["linear.weight"]
