"""Tests for benchmarks/linear_probe.py: the relation probe finds a planted signal and counts the right scenes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _tiny_model import save_tiny_model

from sharedris.data.synthetic import SyntheticRefScenes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "linear_probe.py"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("linear_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pick_probe_finds_a_planted_referent_and_nothing_in_noise() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 3, 8)), rng.integers(0, 3, 300)
    noise = _script()._pick_probe(x, y)
    x[np.arange(300), y, 5] += 3.0  # feature 5 marks the referent
    planted = _script()._pick_probe(x, y)
    assert planted > 0.9 and noise < 0.55


def test_the_relation_probe_scores_every_scene_with_three_candidates(tmp_path: Path, monkeypatch, capsys) -> None:
    model = save_tiny_model(tmp_path / "m")
    scenes = list(SyntheticRefScenes("val", size=64, length=40, families=("relation",)))
    three = [s for s in scenes if sum(o["shape"] == s["objects"][s["target"]]["shape"] for o in s["objects"]) == 3]
    far = sum(" from " in s["text"] for s in three)
    assert 0 < far < len(three)
    monkeypatch.setattr(sys, "argv", ["linear_probe.py", str(model), "--relations", "--scenes", "40"])
    _script().main()
    out = capsys.readouterr().out
    counts = {line.split(":")[0]: int(line.split()[1]) for line in out.splitlines() if line.startswith(("near:", "far:"))}
    assert counts == {"near": len(three) - far, "far": far}
    assert out.count("  pixel ") == 2
