"""Resume fingerprints, checkpoint folders and keep-the-best selection (retrieval.models.checkpoints).

KeepBest is exercised with a small "model": a string whose save() writes it into the folder, so what the best folder
holds says which model was kept. The cross-encoder tests run it inside a real Trainer."""

import hashlib
import json

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from retrieval.models.base import prepare_checkpoint_dir as prepare_from_base
from retrieval.models.checkpoints import KeepBest, prepare_checkpoint_dir, rows_fingerprint

COLUMNS = {"query": ["volcano lava", "honey bees"], "document": ["Volcanoes erupt.", "Bees make honey."],
           "label": [1.0, 0.0]}


def save_text(model: str, path) -> None:
    (path / "weights.txt").write_text(model)


def kept_text(keeper: KeepBest) -> str:
    return (keeper.best_dir / "weights.txt").read_text()


# --- rows_fingerprint -----------------------------------------------------------------------------------------------
def test_fingerprint_is_the_sha256_of_names_lengths_and_json_values():
    # By hand: a header line ["column", name, length] per column, then one JSON value per line.
    text = '["column", "query", 2]\n"a"\n{"x": 1, "y": [2]}\n["column", "label", 1]\n1.0\n'
    assert rows_fingerprint({"query": ["a", {"y": [2], "x": 1}], "label": [1.0]}) == \
        hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("change", ["text", "order", "label", "column name", "split between columns", "join"])
def test_fingerprint_changes_with_any_row_change(change):
    changed = {name: list(values) for name, values in COLUMNS.items()}
    if change == "text":
        changed["document"][1] = "Bees make honey!"
    elif change == "order":
        changed = {name: values[::-1] for name, values in changed.items()}
    elif change == "label":
        changed["label"][0] = 0.0
    elif change == "column name":
        changed["passage"] = changed.pop("document")
        changed["label"] = changed.pop("label")  # keep the column order: only the name differs
    elif change == "split between columns":  # the same values in sequence, cut into columns differently
        changed = {"query": COLUMNS["query"] + COLUMNS["document"][:1], "document": COLUMNS["document"][1:],
                   "label": COLUMNS["label"]}
    elif change == "join":  # two texts run together are not the two texts
        changed["query"] = ["volcano lavahoney bees"]
    assert rows_fingerprint(changed) != rows_fingerprint(COLUMNS)
    assert rows_fingerprint({name: list(values) for name, values in COLUMNS.items()}) == rows_fingerprint(COLUMNS)


def test_fingerprint_rejects_a_text_as_a_column():
    with pytest.raises(ValueError, match="column 'query' must be a sequence"):
        rows_fingerprint({"query": "volcano lava"})
    with pytest.raises(ValueError, match="expected a mapping"):
        rows_fingerprint([["a"]])


# --- prepare_checkpoint_dir -----------------------------------------------------------------------------------------
def test_same_fingerprint_resumes_and_another_clears(tmp_path):
    folder = tmp_path / "checkpoints"
    fingerprint = {"config": {"lr": 1e-3}, "rows": rows_fingerprint(COLUMNS)}
    assert prepare_checkpoint_dir(folder, fingerprint) == (folder, False)  # nothing yet to resume from
    (folder / "checkpoint-4").mkdir()
    (folder / "best.json").write_text("{}")
    assert prepare_checkpoint_dir(folder, dict(fingerprint)) == (folder, True)
    assert (folder / "checkpoint-4").is_dir() and (folder / "best.json").is_file()

    # New negatives with the same row count: another rows hash, so the stale checkpoint (and its best) goes.
    stale = {"config": {"lr": 1e-3}, "rows": rows_fingerprint({**COLUMNS, "document": ["Lava.", "Bees make honey."]})}
    assert prepare_from_base(folder, stale) == (folder, False)  # base.py's name for it does the same
    assert sorted(p.name for p in folder.iterdir()) == ["fingerprint.txt"]


def test_a_folder_without_a_fingerprint_is_cleared(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-2").mkdir(parents=True)
    assert prepare_checkpoint_dir(folder, {"config": 1}) == (folder, False)
    assert sorted(p.name for p in folder.iterdir()) == ["fingerprint.txt"]


# --- KeepBest -------------------------------------------------------------------------------------------------------
def test_base_is_kept_when_every_epoch_scores_lower(tmp_path):
    keeper = KeepBest(tmp_path, "eval_val_ndcg", save_text)
    assert keeper.best_dir is None and keeper.best_label is None and not keeper.has_base
    assert keeper.record("base", 0.5, "base weights") is True
    assert keeper.record("epoch 1", 0.4, "epoch 1 weights", 3) is False
    assert keeper.record("epoch 2", 0.45, "epoch 2 weights", 6) is False
    assert (keeper.best_label, keeper.best_score, keeper.base_score, keeper.has_base) == ("base", 0.5, 0.5, True)
    assert kept_text(keeper) == "base weights"
    assert keeper.history == [{"label": "base", "score": 0.5, "step": 0}, {"label": "epoch 1", "score": 0.4, "step": 3},
                              {"label": "epoch 2", "score": 0.45, "step": 6}]


def test_a_better_epoch_replaces_the_base_and_ties_keep_the_earlier(tmp_path):
    keeper = KeepBest(tmp_path, "eval_val_ndcg", save_text)
    keeper.record("base", 0.5, "base weights")
    assert keeper.record("epoch 1", 0.5, "epoch 1 weights", 3) is False  # a tie: the base stays
    assert keeper.record("epoch 2", 0.6, "epoch 2 weights", 6) is True
    assert keeper.record("epoch 3", 0.6, "epoch 3 weights", 9) is False  # a tie again: epoch 2 stays
    assert keeper.record("epoch 4", 0.55, "epoch 4 weights", 12) is False
    assert (keeper.best_label, keeper.best_score, kept_text(keeper)) == ("epoch 2", 0.6, "epoch 2 weights")
    assert keeper.base_score == 0.5


def test_without_base_the_best_epoch_is_kept_even_below_the_base(tmp_path):
    keeper = KeepBest(tmp_path, "eval_val_ndcg", save_text, include_base=False)
    assert keeper.record("base", 0.9, "base weights") is False
    assert (keeper.has_base, keeper.base_score, keeper.best_label, keeper.best_dir) == (True, 0.9, None, None)
    assert not (tmp_path / "best").exists()
    assert keeper.record("epoch 1", 0.1, "epoch 1 weights", 3) is True
    assert keeper.record("epoch 2", 0.05, "epoch 2 weights", 6) is False
    assert (keeper.best_label, keeper.best_score, kept_text(keeper)) == ("epoch 1", 0.1, "epoch 1 weights")


def test_state_survives_a_new_keeper_on_the_same_folder(tmp_path):
    first = KeepBest(tmp_path, "eval_val_ndcg", save_text)
    first.record("base", 0.5, "base weights")
    first.record("epoch 1", 0.7, "epoch 1 weights", 3)
    assert json.loads((tmp_path / "best.json").read_text()) == {
        "label": "epoch 1", "score": 0.7,
        "history": [{"label": "base", "score": 0.5, "step": 0}, {"label": "epoch 1", "score": 0.7, "step": 3}]}

    resumed = KeepBest(tmp_path, "eval_val_ndcg", save_text)  # a resumed run
    assert (resumed.best_label, resumed.best_score, resumed.has_base, resumed.base_score) == ("epoch 1", 0.7, True, 0.5)
    assert resumed.history == first.history
    assert resumed.record("epoch 2", 0.65, "epoch 2 weights", 6) is False  # compared with the restored best
    assert kept_text(resumed) == "epoch 1 weights"
    # An epoch whose evaluation ran after the last checkpoint is evaluated again on resume: one entry, the new one.
    assert resumed.record("epoch 2", 0.8, "epoch 2 again", 6) is True
    assert [entry["label"] for entry in resumed.history] == ["base", "epoch 1", "epoch 2"]
    assert resumed.history[-1]["score"] == 0.8 and kept_text(resumed) == "epoch 2 again"


def test_a_kept_base_cannot_resume_into_a_run_that_never_keeps_it(tmp_path):
    KeepBest(tmp_path, "eval_val_ndcg", save_text).record("base", 0.5, "base weights")
    with pytest.raises(ValueError, match="include_base=False"):
        KeepBest(tmp_path, "eval_val_ndcg", save_text, include_base=False)


def test_best_folder_is_swapped_atomically(tmp_path):
    keeper = KeepBest(tmp_path, "eval_val_ndcg", save_text)
    keeper.record("base", 0.5, "base weights")
    keeper.record("epoch 1", 0.6, "epoch 1 weights", 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "best.json"]  # no temporary folder left
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["weights.txt"]

    def failing_save(model, path):
        (path / "weights.txt").write_text("half written")
        raise OSError("disk full")

    keeper.save = failing_save
    with pytest.raises(OSError, match="disk full"):
        keeper.record("epoch 2", 0.9, "epoch 2 weights", 6)
    # The failed save leaves the previous best whole, named as the best, and nothing else behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "best.json"]
    assert kept_text(keeper) == "epoch 1 weights"
    assert json.loads((tmp_path / "best.json").read_text())["label"] == "epoch 1"
    assert KeepBest(tmp_path, "eval_val_ndcg", save_text).best_score == 0.6


def test_nan_scores_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'epoch 1' is NaN"):
        KeepBest(tmp_path, "eval_val_ndcg", save_text).record("epoch 1", float("nan"), "weights")


def test_on_evaluate_records_the_trainer_metric_per_epoch(tmp_path):
    keeper = KeepBest(tmp_path / "checkpoints", "eval_val_ndcg@10", save_text)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    # The Trainer's state after the second epoch of 7 steps each (its epoch is a float).
    state, control = TrainerState(epoch=2.0, global_step=14), TrainerControl()
    keeper.on_evaluate(args, state, control, metrics={"eval_val_ndcg@10": 0.75, "eval_loss": 0.3},
                       model="epoch 2 weights")
    assert keeper.history == [{"label": "epoch 2", "score": 0.75, "step": 14}]
    assert kept_text(keeper) == "epoch 2 weights"
    with pytest.raises(ValueError, match="no 'eval_val_ndcg@10'; its metrics are eval_loss, eval_val_map"):
        keeper.on_evaluate(args, state, control, metrics={"eval_val_map": 0.5, "eval_loss": 0.3}, model="m")
