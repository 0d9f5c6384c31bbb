"""Fixtures shared by the predictor, CLI, bulk and service tests."""

import os

import pytest
from _tiny_model import save_tiny_model

from sharedris.modeling.pretrained import load_pretrained
from sharedris.predictor import Predictor


@pytest.fixture(scope="session", autouse=True)
def sharedris_home(tmp_path_factory):
    """The tests' own sharedris folder (converted models), unless SHAREDRIS_HOME names one: a run
    with SHAREDRIS_HOME set finds the conversions of the run before it."""
    if not os.environ.get("SHAREDRIS_HOME"):
        os.environ["SHAREDRIS_HOME"] = str(tmp_path_factory.mktemp("sharedris_home"))
    return os.environ["SHAREDRIS_HOME"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A randomly initialised, very small checkpoint folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model") / "tiny")


@pytest.fixture(scope="session")
def empty_mask_model_dir(tmp_path_factory):
    """A tiny model sure that every expression is present (presence 1) whose masks have no pixel."""
    return save_tiny_model(tmp_path_factory.mktemp("empty_mask") / "emptymask", presence_bias=20.0, mask_bias=-50.0)


@pytest.fixture(scope="session")
def predictor(model_dir):
    # fp32: a random tiny model's mask logits sit near 0, where bf16 rounding (auto, on a CPU with
    # fast bf16) flips pixels between two ways of batching the same inputs
    return Predictor(load_pretrained(model_dir), precision="fp32")
