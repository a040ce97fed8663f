"""Resumable training and keep-the-best selection, shared by every training loop.

- :func:`rows_fingerprint` and :func:`prepare_checkpoint_dir`: step checkpoints survive a failed run and the next
  run resumes from them, but only when they were made by the same configuration *and the very same training rows*
  (a hash of every value, not their count: new negatives with the same row count must not resume a stale run).
- :class:`KeepBest`: a Trainer callback that keeps the model with the highest validation score seen so far, the
  base model (scored before the first step) included, on disk beside the checkpoints so a resumed run still knows
  it. The Trainer's own ``load_best_model_at_end`` cannot do this: it needs checkpoints on the evaluation schedule
  (ours are every N steps, evaluation every epoch) and never considers the base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

from transformers import TrainerCallback

from ..io import atomic_dir, write_json

log = logging.getLogger(__name__)

BASE = "base"  # the label of the model before the first training step


def _canonical(value) -> bytes:
    # JSON never writes a raw newline, so one value per line cannot run into the next one.
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n"


def rows_fingerprint(columns: Mapping[str, Sequence]) -> str:
    """sha256 hex of training columns: every column's name and length, then each of its values in order (as JSON,
    dict keys sorted), so a changed text, label, column name or row order changes it."""
    if not isinstance(columns, Mapping):
        raise ValueError(f"rows_fingerprint: expected a mapping of column name -> values, got {type(columns).__name__}")
    digest = hashlib.sha256()
    for name, values in columns.items():
        if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
            raise ValueError(f"rows_fingerprint: column {name!r} must be a sequence of values, "
                             f"got {type(values).__name__}")
        digest.update(_canonical(["column", str(name), len(values)]))
        for value in values:
            digest.update(_canonical(value))
    return digest.hexdigest()


def prepare_checkpoint_dir(checkpoint_dir: str | Path, fingerprint: dict) -> tuple[Path, bool]:
    """Return (folder, resumable). Checkpoints survive a failed run so the next run resumes from them, but only
    when they were made by the same ``fingerprint`` (configuration and training rows): otherwise the folder is
    cleared, kept best model included. ``resumable``: a ``checkpoint-*`` is there to resume from."""
    folder = Path(checkpoint_dir)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
    stamp = folder / "fingerprint.txt"
    if folder.exists() and (not stamp.exists() or stamp.read_text().strip() != digest):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")
    resumable = any(p.name.startswith("checkpoint-") for p in folder.iterdir())
    return folder, resumable


class KeepBest(TrainerCallback):
    """Keep in ``folder / "best"`` the model with the highest validation score recorded so far, and in
    ``folder / "best.json"`` ``{"label", "score", "history": [{"label", "score", "step"}, ...]}``.

    ``save(model, path)`` writes a model into an existing empty folder. The base model is recorded by the caller
    (``record("base", ...)`` before training); the Trainer's evaluations arrive through :meth:`on_evaluate`,
    ``metric`` being the Trainer's key (``eval_`` + the evaluator's metric). With ``include_base=False`` the base
    is scored (history, :attr:`base_score`) but never kept. A new KeepBest on the same folder carries on from
    best.json, so a resumed run neither forgets its best nor scores its base again (:attr:`has_base`).
    """

    def __init__(self, folder: str | Path, metric: str, save: Callable[[object, Path], None], *,
                 include_base: bool = True) -> None:
        if not metric:
            raise ValueError("KeepBest: metric must name the Trainer's evaluation key, e.g. 'eval_val_ndcg_at_10'")
        self.folder, self.metric, self.save, self.include_base = Path(folder), metric, save, include_base
        self._label: str | None = None
        self._score: float | None = None
        self._history: list[dict] = []
        state_path = self.folder / "best.json"
        if state_path.is_file():
            self._restore(json.loads(state_path.read_text(encoding="utf-8")), state_path)

    def _restore(self, state: dict, state_path: Path) -> None:
        self._history = [{"label": str(e["label"]), "score": float(e["score"]), "step": int(e["step"])}
                         for e in state.get("history", [])]
        label, score = state.get("label"), state.get("score")
        if label is None:
            return
        if label == BASE and not self.include_base:
            raise ValueError(f"{state_path}: the kept model is the base model, but this run never keeps the base "
                             f"(include_base=False): delete {self.folder} to start afresh")
        if not (self.folder / "best").is_dir():
            # best.json is written after the folder, so only a hand-deleted folder gets here: nothing is kept.
            log.warning("%s names %r as the best model, but %s is missing: no model is kept so far",
                        state_path, label, self.folder / "best")
            return
        self._label, self._score = str(label), float(score)

    # --- state ----------------------------------------------------------------------------------------------------
    @property
    def best_label(self) -> str | None:
        return self._label

    @property
    def best_score(self) -> float | None:
        return self._score

    @property
    def best_dir(self) -> Path | None:
        """The kept model's folder, or None when none is kept yet."""
        return self.folder / "best" if self._label is not None else None

    @property
    def history(self) -> list[dict]:
        return [dict(entry) for entry in self._history]

    @property
    def base_score(self) -> float | None:
        return next((entry["score"] for entry in self._history if entry["label"] == BASE), None)

    @property
    def has_base(self) -> bool:
        return any(entry["label"] == BASE for entry in self._history)

    # --- recording ------------------------------------------------------------------------------------------------
    def record(self, label: str, score: float, model, step: int = 0) -> bool:
        """Add ``label``'s validation ``score`` to the history; save ``model`` as the best and return True iff the
        score beats the best so far (strictly: a tie keeps the earlier model). A label recorded again (a resumed run
        re-evaluating an epoch that ended after its last checkpoint) replaces its history entry."""
        score = float(score)
        if math.isnan(score):
            raise ValueError(f"KeepBest: validation score of {label!r} is NaN")
        entry = {"label": str(label), "score": score, "step": int(step)}
        same = [i for i, old in enumerate(self._history) if old["label"] == entry["label"]]
        if same:
            self._history[same[0]] = entry
        else:
            self._history.append(entry)
        keep = (self.include_base or label != BASE) and (self._score is None or score > self._score)
        if keep:
            # The best folder is swapped in whole, then best.json names it: a crash in save() leaves the old best.
            with atomic_dir(self.folder / "best") as tmp:
                self.save(model, tmp)
            self._label, self._score = entry["label"], score
        write_json({"label": self._label, "score": self._score, "history": self._history}, self.folder / "best.json")
        return keep

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not metrics or self.metric not in metrics:
            raise ValueError(f"KeepBest: the evaluation has no {self.metric!r}; its metrics are "
                             f"{', '.join(sorted(metrics or {})) or 'none'}")
        self.record(f"epoch {round(state.epoch or 0)}", metrics[self.metric], model, state.global_step)


SELECTIONS = ("validation", "trained")


def check_selection(selection: str, setting: str) -> None:
    """``selection`` is "validation" (the best of base and epochs) or "trained" (the best epoch); ``setting`` names
    where it came from, for the error."""
    if selection not in SELECTIONS:
        raise ValueError(f"{setting}: expected one of {', '.join(SELECTIONS)}, got {selection!r}")


def score_final_epoch(keeper: KeepBest, epochs: int, score: Callable[[], float], model, step: int) -> None:
    """Score the last epoch if no evaluation did: a step checkpoint saved at the very last step, before the
    epoch-end evaluation, resumes into a run with no steps left, which the Trainer never evaluates."""
    label = f"epoch {int(epochs)}"
    if epochs > 0 and not any(entry["label"] == label for entry in keeper.history):
        keeper.record(label, score(), model, step)


def save_kept_model(keeper: KeepBest, out_dir: str | Path, save_last: Callable[[Path], None]) -> None:
    """Write the kept model to ``out_dir`` atomically; ``save_last(folder)`` saves the last model when nothing was
    kept (no validation pass ran)."""
    with atomic_dir(out_dir) as tmp:
        if keeper.best_dir is not None:
            shutil.copytree(keeper.best_dir, tmp, dirs_exist_ok=True)
        else:
            save_last(tmp)


def selection_summary(keeper: KeepBest) -> dict:
    """What validation chose, for metrics/train.json: base and best scores, and which model was kept."""
    epochs = [entry for entry in keeper.history if entry["label"] != "base"]
    kept = keeper.best_label or (epochs[-1]["label"] if epochs else "last")
    return {
        "val_ndcg_at_10_base": keeper.base_score,
        "val_ndcg_at_10_epochs": [entry["score"] for entry in epochs],
        "val_ndcg_at_10_best": keeper.best_score,
        "kept": kept,
        "kept_base": int(kept == "base"),
    }
