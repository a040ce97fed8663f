"""What every model family receives and returns.

A family is one module in ``retrieval.models`` exposing:

- ``TRAINABLE``: whether the train stage fine-tunes it;
- ``DISTILLABLE`` (optional, default False): whether ``train`` honours ``settings.distill`` (Margin-MSE);
- ``train(config, data, out_dir, settings, *, checkpoint_dir, callbacks) -> dict`` (summary), saving a
  ``save_pretrained``-style folder into ``out_dir``;
- ``build_index(model_ref, corpus, index_dir, config) -> dict`` (index stats), where ``model_ref`` is the base
  model id (the baseline) or the fine-tuned folder;
- ``search(index_dir, queries, k, config) -> {qid: [(doc_id, score), ...]}`` in pyserini's batch_search shape; it
  records what the encoder resolved to in the index (``retrieval.identity``) and refuses to search with an encoder
  that resolves to other weights;
- ``embedder(index_dir, config) -> Embedder`` (optional; the families whose scores are inner products of
  vectors): the encoder the index was built with, encoding queries and documents exactly as the index and
  ``search`` do, so other collections can be scored the same way (``retrieval.generalization``).

Training scores the base model and every epoch with retrieval over the validation corpus
(``retrieval.models.validation``) and saves the best (``retrieval.models.checkpoints.KeepBest``).

``config`` is the family's own section of the params (``models.<family>``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


@dataclass(frozen=True)
class Embedder:
    """A model's query and document encoders as an index of it encodes them: the inner product of a query's and a
    document's vectors is the family's score. ``model`` is the ``SentenceTransformer`` behind them (mteb reads its
    name and similarity from it)."""

    model: Any
    encode_queries: Callable[[list[str]], Any]  # texts -> float32 array (n, dim)
    encode_documents: Callable[[Sequence[Mapping]], Any]  # BEIR documents ({"title", "text"}) -> float32 array


@dataclass
class TrainSettings:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    negatives_per_query: int = 1
    seed: int = 42
    # Margin-MSE on a cross-encoder's score margins instead of the family's contrastive loss (families with
    # DISTILLABLE = True); the student's similarities are multiplied by distill_scale to meet the teacher's logit range.
    distill: bool = False
    distill_scale: float = 20.0
    # A checkpoint every this many steps (plus one per epoch), so an interrupted run loses at most this many.
    checkpoint_steps: int = 10
    # "validation": the best of the base model and every epoch on validation nDCG@10 is kept (the base when no
    # epoch beats it); "trained": the best epoch, even when the base model scores higher.
    selection: str = "validation"
    # Validation retrieves over "all" of the corpus, or over a seeded sample of this many documents.
    validation_corpus: str | int = "all"
    # Autocast precision of the training steps (weights and optimizer state stay fp32): "auto" is bf16 where the
    # CPU or GPU computes it natively (a step costs ~0.6x fp32 on an avx512_bf16 CPU), else fp32.
    precision: str = "fp32"


@dataclass
class TrainingData:
    """Training triplets from mined hard negatives plus a validation retrieval task."""

    # {"query": str, "positive": {"title","text"}, "negatives": [{"title","text"}, ...]} per (query, positive);
    # with distillation also "teacher": [teacher score of the positive, of negatives[0], negatives[1], ...]
    examples: list[dict]
    val_queries: dict[str, str] = field(default_factory=dict)
    val_corpus: dict[str, dict] = field(default_factory=dict)
    val_qrels: dict[str, dict[str, int]] = field(default_factory=dict)
    # Inference precision of the validation passes (the index stages' encode.precision, resolved).
    precision: str = "fp32"
    # The index stages' encoding (retrieval.encoding.Encoding; None: torch in ``precision``): a family that can
    # encode through an export validates through one, so that validation scores what will be indexed.
    encoding: object | None = None
    # The base model's validation run {qid: {doc: score}} when already computed (the baseline index searched with
    # the validation queries); None: validation runs the base model itself.
    base_run: dict | None = None


def prepare_checkpoint_dir(checkpoint_dir: str | Path, fingerprint: dict) -> tuple[Path, bool]:
    """Moved to :func:`retrieval.models.checkpoints.prepare_checkpoint_dir` (kept here for existing callers).
    Imported when called: that module loads transformers (and torch), which importing base.py should not."""
    from .checkpoints import prepare_checkpoint_dir as prepare

    return prepare(checkpoint_dir, fingerprint)


def whole_run_training_loss(training_loss: float, log_history: list[dict], resumed: bool) -> float | None:
    """The mean training loss of the whole run. After a resume, the Trainer's ``training_loss`` sums only the steps
    run since but divides by all steps (0 when the checkpoint was the last step); the log history, restored with
    the checkpoint, covers the whole run, so a resumed run reports the mean of its logged losses (None if none)."""
    if not resumed:
        return float(training_loss)
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return float(sum(losses) / len(losses)) if losses else None


def is_unset(value) -> bool:
    """A param left empty: YAML null, or the string forms that ``dvc exp run -S key=null`` may leave."""
    return value is None or str(value).strip() in {"", "None", "null"}


FAMILY_OVERRIDES = ("learning_rate", "distill_scale")


def with_family_overrides(settings: TrainSettings, config) -> TrainSettings:
    """A family section's own ``learning_rate`` or ``distill_scale`` (when set) overrides the ``train`` one:
    adapters and an already-trained SPLADE want other rates than full fine-tuning of a dense model, and a
    sparse model's dot products need no scaling to meet a cross-encoder's logit margins, unlike cosine."""
    overrides = {key: float((config or {})[key]) for key in FAMILY_OVERRIDES if not is_unset((config or {}).get(key))}
    return replace(settings, **overrides) if overrides else settings


def settings_dict(settings: TrainSettings) -> dict:
    return asdict(settings)
