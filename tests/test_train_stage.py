"""The train stage's params handling: a family's model section plus its training section."""

import click
import pytest

from stages.train import family_training_config

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
