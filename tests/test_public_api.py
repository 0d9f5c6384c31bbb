"""The public API: `from sharedris import *`, `dir(sharedris)` and lazy imports agree."""

from __future__ import annotations

import subprocess
import sys

import sharedris


def test_public_names_are_listed_and_resolve():
    assert "load_pretrained" in sharedris.__all__ and "Predictor" in sharedris.__all__
    for name in sharedris.__all__:
        assert name in dir(sharedris), name
        assert getattr(sharedris, name) is not None
    namespace: dict = {}
    exec("from sharedris import *", namespace)
    assert set(sharedris.__all__) <= set(namespace)


def test_importing_sharedris_does_not_import_torch():
    code = "import sys, sharedris; dir(sharedris); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
