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
                                                   r"epochs, batch_size, .*train\.<family> \(bm25, dense, "):
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
