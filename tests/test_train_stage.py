"""The train stage's params handling: a family's model section plus its training section."""

from pathlib import Path

import click
import pytest
import yaml

from retrieval.models import FAMILIES
from stages.train import SHARED_SETTINGS, family_training_config, shared_training_settings

PARAMS = {
    "train": {"epochs": 1, "learning_rate": 5e-5, "splade": {"learning_rate": 2e-5, "query_regularizer": 5e-5}},
    "models": {"splade": {"base_model": "naver/splade-v3", "max_seq_length": 256}, "dense": {"base_model": "m"}},
}


def test_training_settings_join_the_model_section():
    assert family_training_config(PARAMS, "splade") == {
        "base_model": "naver/splade-v3", "max_seq_length": 256, "learning_rate": 2e-5, "query_regularizer": 5e-5}


def test_a_family_without_training_settings_gets_its_model_section():
    assert family_training_config(PARAMS, "dense") == {"base_model": "m"}


def test_a_training_setting_under_models_is_an_error_naming_where_it_belongs():
    params = {**PARAMS, "models": {"splade": {"base_model": "x", "learning_rate": 1e-5}}}
    with pytest.raises(click.ClickException, match=r"models\.splade\.learning_rate is a training setting: "
                                                   r"set train\.splade\.learning_rate instead"):
        family_training_config(params, "splade")


def test_training_settings_must_be_a_mapping():
    params = {**PARAMS, "train": {"splade": 2e-5}}
    with pytest.raises(click.ClickException, match=r"train\.splade: expected a mapping"):
        family_training_config(params, "splade")


def test_shared_settings_and_the_top_level_seed_make_the_train_settings():
    settings = shared_training_settings({"seed": 7, **PARAMS})
    assert (settings.epochs, settings.learning_rate, settings.seed) == (1, 5e-5, 7)
    assert settings.batch_size == 32  # unset: TrainSettings' default


def test_an_unknown_train_key_is_an_error_listing_the_known_ones():
    params = {**PARAMS, "train": {"epoch": 2, "splade": {}}}
    with pytest.raises(click.ClickException, match=r"unknown train\.epoch: the shared training settings are "
                                                   r"epochs, batch_size, .*train\.<family> \(bm25, colbert, dense, "):
        shared_training_settings(params)


def test_dvc_tracks_every_setting_the_train_stage_reads():
    """dvc.yaml lists the shared settings one by one (so another family's section does not rerun training); a
    shared setting missing there would be read but not tracked, and a changed value would not rerun train."""
    root = Path(__file__).resolve().parents[1]
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["train"]
    tracked = {p for p in stage["params"] if isinstance(p, str)}
    # encode: validation passes encode in the index stages' precision
    assert {f"train.{name}" for name in SHARED_SETTINGS} | {"seed", "model", "train.${model}", "models.${model}",
                                                           "encode"} == tracked
    train_params = yaml.safe_load((root / "params.yaml").read_text())["train"]
    assert set(train_params) - set(FAMILIES) <= set(SHARED_SETTINGS)
    # train.${model} must resolve for every family, so each has a section (empty when it has nothing of its own)
    assert all(isinstance(train_params.get(name), dict) for name in FAMILIES)


def _records(query_id: str, positive: str, negatives: list[str]) -> dict:
    return {"query_id": query_id, "query": f"query {query_id}", "positives": [{"doc_id": positive, "grade": 1}],
            "negatives": [{"doc_id": d, "rank": i + 1} for i, d in enumerate(negatives)]}


def test_validation_searches_the_whole_corpus_or_a_sample_holding_positives_and_candidates():
    from stages.train import training_data

    corpus = {f"d{i}": {"title": "", "text": f"document {i}"} for i in range(40)}
    train = [_records("t1", "d0", ["d1"])]
    val = [_records("v1", "d2", ["d3", "d4"]), {**_records("v2", "d5", []), "positives": []}]
    whole = training_data(corpus, train, val)
    assert set(whole.val_corpus) == set(corpus) and whole.val_qrels == {"v1": {"d2": 1}}
    assert list(whole.val_queries) == ["v1"]  # a validation query without positives is not scored
    sample = training_data(corpus, train, val, validation_corpus=12, seed=3)
    assert len(sample.val_corpus) == 12 and {"d2", "d3", "d4"} <= set(sample.val_corpus)
    assert training_data(corpus, train, val, validation_corpus=12, seed=3).val_corpus == sample.val_corpus
    # 1 positive: a sample must hold at least 10 documents
    with pytest.raises(click.ClickException, match=r"validation_corpus 9: a sample must hold at least 10x the 1"):
        training_data(corpus, train, val, validation_corpus=9)
    with pytest.raises(click.ClickException, match=r"validation_corpus: expected 'all' or a number"):
        training_data(corpus, train, val, validation_corpus="most")


def test_the_base_run_is_read_off_the_baseline_index_only_when_it_is_the_same_search(tmp_path, monkeypatch):
    import json

    from retrieval.models.base import TrainingData
    from stages import train as train_stage

    index = tmp_path / "data/indexes/baseline"
    index.mkdir(parents=True)
    monkeypatch.setitem(train_stage.INDEX_DIRS, "baseline", index)

    class Family:  # search's contract: {qid: [(doc, score), ...]}
        @staticmethod
        def search(index_dir, queries, k, config):
            return {q: [("d1", 2.0), ("d0", 1.0)] for q in queries}

    data = TrainingData(examples=[], val_queries={"v1": "q"}, val_corpus={"d0": {}, "d1": {}},
                        val_qrels={"v1": {"d1": 1}}, precision="bf16")

    def base_run(info: dict, corpus_size: int = 2):
        (index / "index.json").write_text(json.dumps(info))
        return train_stage.baseline_validation_run(Family, {}, data, corpus_size)

    built = {"kind": "flat", "encoder_identity": {"precision": "bf16", "models": []}}
    assert base_run(built) == {"v1": {"d1": 2.0, "d0": 1.0}}
    assert base_run({**built, "kind": "hnsw"}) is None  # approximate search would score the base unfairly
    assert base_run({**built, "encoder_identity": {"precision": "fp32"}}) is None  # validation encodes in bf16
    assert base_run(built, corpus_size=3) is None  # validation searches a sample, the index the whole corpus
