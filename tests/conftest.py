"""Fixtures shared by the predictor, CLI and service tests."""

import pytest
from _tiny_model import save_tiny_model

from sharedris.modeling.pretrained import load_pretrained
from sharedris.predictor import Predictor


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A randomly initialised, very small checkpoint folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model") / "tiny")


@pytest.fixture(scope="session")
def predictor(model_dir):
    return Predictor(load_pretrained(model_dir))
