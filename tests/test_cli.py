"""User errors surface as one line on stderr and exit code 2; checkpoint folders refuse the wrong model."""

import json
import subprocess
import sys

import pytest
import torch
from _tiny_model import TINY_MODEL

from sharedris.data.synthetic import write_refer_format
from sharedris.modeling.pretrained import PretrainedError, load_pretrained, resolve_tokenizer, save_pretrained
from sharedris.modeling.registry import build_model, model_config

TINY_TRAIN = [f"model_overrides={json.dumps(TINY_MODEL)}", "data.synthetic_image_size=64",
              "data.synthetic_train_size=16", "data.synthetic_eval_size=4", "data.num_workers=0",
              "batch_size=8", "epochs=1", "amp=none"]


def _sharedris(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sharedris", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("sharedris train: error:")
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("args, needles", [
    (["epochz=3"], ["'epochz'"]),
    (["optim.lrr=1e-4"], ["'optim.lrr'"]),
    (["epochs=abc"], ["epochs"]),
    (["--config", "no/such/exp.yaml"], ["no/such/exp.yaml", "does not exist"]),
])
def test_train_config_errors_exit_2_with_one_line(tmp_path, args, needles):
    result = _sharedris("train", *args, f"out_dir={tmp_path / 'run'}", "--device", "cpu", cwd=tmp_path)
    _assert_user_error(result, *needles)
    assert not (tmp_path / "run").exists()


def test_train_on_a_missing_dataset_exits_2_with_one_line(tmp_path):
    result = _sharedris("train", *TINY_TRAIN, "data.dataset=refcoco", "data.root=/nonexistent",
                        f"out_dir={tmp_path / 'run'}", "--device", "cpu", cwd=tmp_path)
    _assert_user_error(result, "refcoco" if "unknown dataset" in result.stderr else "/nonexistent")


def test_stem_pretraining_on_data_without_object_labels_exits_2_with_one_line(tmp_path):
    write_refer_format(tmp_path / "data", splits={"train": 8, "val": 2}, size=64)
    result = _sharedris("train", *TINY_TRAIN, "data.dataset=refcoco", f"data.root={tmp_path / 'data'}",
                        "stem_pretrain.steps=5", f"out_dir={tmp_path / 'run'}", "--device", "cpu", cwd=tmp_path)
    _assert_user_error(result, "stem_pretrain.steps=5", "per-object category labels")
    assert not (tmp_path / "run").exists()


def _saved_tiny(tmp_path):
    cfg = model_config("sharedris_tiny", **TINY_MODEL)
    torch.manual_seed(0)
    return save_pretrained(build_model(cfg), cfg, tmp_path / "ckpt", resolve_tokenizer(cfg))


def test_load_pretrained_round_trips(tmp_path):
    folder = _saved_tiny(tmp_path)
    model = load_pretrained(folder)
    assert model.config == model_config("sharedris_tiny", **TINY_MODEL)
    assert not model.training


@pytest.mark.parametrize("edit", [
    lambda m: m["encoder"].update(embed_dim=48),  # same names, other shapes
    lambda m: (m["fpn"].update(width=32), m["decoder"].update(width=32)),
    lambda m: m["decoder"].update(depth=2),  # weights missing for the second block
])
def test_load_pretrained_refuses_weights_of_another_architecture(tmp_path, edit):
    folder = _saved_tiny(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    edit(meta["model"])
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(PretrainedError, match="another model"):
        load_pretrained(folder)


def test_load_pretrained_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(PretrainedError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="config.json"):
        load_pretrained(tmp_path / "empty")
