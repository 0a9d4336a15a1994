"""Every list of choices is defined once: the config's allowed values are the implementation's."""

from __future__ import annotations

import typing

import pytest

from hpcbnn.bnn.layers import ESTIMATORS, MEAN_INITS, BayesianLinear
from hpcbnn.bnn.models import MODELS, build_model
from hpcbnn.data.augment import AUGMENT_NAMES, AUGMENTATIONS, augmentation
from hpcbnn.errors import UsageError
from hpcbnn.parallel.collectives import BACKENDS
from hpcbnn.parallel.engine import AUGMENT_MODES, OBJECTIVES
from hpcbnn.parallel.grid import MODES, resolve_shape
from hpcbnn.run.config import Config, parse_config

FIELDS = {
    "augment": AUGMENT_NAMES,
    "augment_mode": AUGMENT_MODES,
    "estimator": ESTIMATORS,
    "objective": tuple(OBJECTIVES),
    "mode": MODES,
    "backend": BACKENDS,
    "model": MODELS,
}


@pytest.mark.parametrize("field", FIELDS)
def test_config_allows_exactly_the_implemented_choices(field: str) -> None:
    assert typing.get_args(typing.get_type_hints(Config)[field]) == FIELDS[field]


@pytest.mark.parametrize("field", FIELDS)
def test_every_choice_parses(field: str) -> None:
    for choice in FIELDS[field]:
        assert getattr(parse_config([f"--{field}", choice]), field) == choice


def test_mean_inits_are_the_config_choices() -> None:
    (choices, none) = typing.get_args(typing.get_type_hints(Config)["means"])
    assert typing.get_args(choices) == MEAN_INITS and none is type(None)
    for choice in MEAN_INITS:
        assert parse_config(["--means", choice]).means == choice


def test_augmentations_are_the_named_ones() -> None:
    assert tuple(AUGMENTATIONS) == AUGMENT_NAMES
    assert "crop" in AUGMENT_NAMES
    with pytest.raises(UsageError, match="none, flip, crop, cifar"):
        augmentation("zoom")


def test_each_estimator_and_mode_is_implemented() -> None:
    for estimator in ESTIMATORS:
        assert BayesianLinear(2, 3, estimator=estimator).estimator == estimator
    with pytest.raises(UsageError, match=", ".join(ESTIMATORS)):
        BayesianLinear(2, 3, estimator="exact")
    for mode in MODES:
        assert resolve_shape(mode, 4, 2).size == 4
    with pytest.raises(UsageError, match=", ".join(MODES)):
        resolve_shape("pipeline", 4, 2)


def test_each_model_name_is_known() -> None:
    """Image models refuse a flat input by name (without being built): each name is recognised."""
    for name in MODELS[1:]:
        with pytest.raises(UsageError, match=f"--model {name} needs images"):
            build_model(name, (64,), 10)
    with pytest.raises(UsageError, match=", ".join(MODELS)):
        build_model("lenet", (64,), 10)
