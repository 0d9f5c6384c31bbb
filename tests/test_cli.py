"""User errors surface as one line on stderr and exit code 2; checkpoint folders refuse the wrong model."""

import argparse
import json
import subprocess
import sys

import pytest
import torch
from _tiny_model import TINY_MODEL

from sharedris.data.synthetic import write_refer_format
from sharedris.modeling.pretrained import PretrainedError, load_pretrained, save_pretrained
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
    return save_pretrained(build_model(cfg), tmp_path / "ckpt")


def test_load_pretrained_round_trips(tmp_path):
    folder = _saved_tiny(tmp_path)
    model = load_pretrained(folder)
    assert model.config == model_config("sharedris_tiny", **TINY_MODEL)
    assert not model.training


@pytest.mark.parametrize("edit", [
    lambda m: m["encoder"].update(embed_dim=48),  # same names, other shapes
    lambda m: m["fpn"].update(width=32),
    lambda m: m["decoder"].update(depth=2),  # weights missing for the second block
])
def test_load_pretrained_refuses_weights_of_another_architecture(tmp_path, edit):
    folder = _saved_tiny(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    edit(meta["model"])
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(PretrainedError, match="another model"):
        load_pretrained(folder)


def test_a_format_2_checkpoint_loads_with_its_iou_head_predicting_the_iou_itself(tmp_path):
    folder = _saved_tiny(tmp_path)
    assert json.loads((folder / "config.json").read_text())["model"]["decoder"]["iou_from_mask"] is True
    assert load_pretrained(folder).config.decoder.iou_from_mask
    meta = json.loads((folder / "config.json").read_text())
    meta["format_version"] = 2
    del meta["model"]["decoder"]["iou_from_mask"]  # format 2 did not have the setting
    (folder / "config.json").write_text(json.dumps(meta))
    model = load_pretrained(folder)
    assert model.config.decoder.iou_from_mask is False
    image = torch.randn(1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        out = model(image, torch.tensor([[0, 5, 6, 2]]))
    assert torch.equal(out.iou_pred, model.decoder.iou_mlp[-1].bias.expand(1))  # zero last layer: the bias alone


def test_load_pretrained_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(PretrainedError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="config.json"):
        load_pretrained(tmp_path / "empty")


# ------------------------------------------------------------- one-sentence errors, in process
def _run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``sharedris *argv`` in this process: (exit code, stdout, stderr)."""
    from sharedris.cli import main

    code = 0
    try:
        main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_sentence(code: int, err: str, command: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"sharedris {command}: error:"), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading a model fails the test: the error must come before any model work."""
    import sharedris.cli

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(sharedris.cli, "_load_model", refuse)


def test_version(capsys):
    import sharedris

    code, out, _ = _run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"sharedris {sharedris.__version__}"


def test_predict_output_path_that_is_a_file_fails_before_model_work(tmp_path, capsys, no_model_work):
    from _tiny_model import scene

    scene(20, 20).save(tmp_path / "img.png")
    (tmp_path / "notes.md").write_text("keep me")
    code, _, err = _run_main(capsys, "predict", str(tmp_path / "img.png"), "-t", "the cat",
                             "-o", str(tmp_path / "notes.md"))
    _assert_one_sentence(code, err, "predict", "notes.md", "is a file")
    assert (tmp_path / "notes.md").read_text() == "keep me"


def test_predict_output_folder_that_cannot_be_created_names_the_path(tmp_path, capsys, no_model_work):
    from _tiny_model import scene

    scene(20, 20).save(tmp_path / "img.png")
    (tmp_path / "file").write_text("")
    code, _, err = _run_main(capsys, "predict", str(tmp_path / "img.png"), "-t", "x",
                             "-o", str(tmp_path / "file" / "sub"))
    line = _assert_one_sentence(code, err, "predict", str(tmp_path / "file" / "sub"))
    assert "Errno" not in line


def test_predict_on_a_folder_says_it_is_a_folder(tmp_path, capsys, no_model_work):
    code, _, err = _run_main(capsys, "predict", str(tmp_path), "-t", "x")
    line = _assert_one_sentence(code, err, "predict", str(tmp_path), "is a directory")
    assert "does not exist" not in line


@pytest.mark.parametrize("command", [["predict", "img.png", "-t", "x"], ["eval"], ["serve"], ["train"]])
@pytest.mark.parametrize("device, needle", [("gpu", "unknown device 'gpu'"), ("cuda", "CUDA"),
                                            ("cuda:3", "CUDA")])
def test_bad_devices_are_one_sentence_before_model_work(tmp_path, capsys, monkeypatch, no_model_work,
                                                         command, device, needle):
    from _tiny_model import scene

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    scene(20, 20).save(tmp_path / "img.png")
    code, _, err = _run_main(capsys, *command, "--device", device)
    _assert_one_sentence(code, err, command[0], needle)


def test_resolve_device(monkeypatch):
    from sharedris.devices import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "", "cuda:x", "cpu:1", "mps"):
        with pytest.raises(DeviceError, match="unknown device"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_serve_port_out_of_range_is_one_sentence(capsys, no_model_work):
    code, _, err = _run_main(capsys, "serve", "--port", "99999")
    _assert_one_sentence(code, err, "serve", "99999", "0 to 65535")


def test_serve_port_in_use_is_one_sentence(capsys, monkeypatch):
    import socket

    import sharedris.serve.app

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(sharedris.serve.app, "create_app", refuse)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = _run_main(capsys, "serve", "--port", str(port))
    _assert_one_sentence(code, err, "serve", f"127.0.0.1:{port}", "in use")


def test_an_architecture_with_bundled_weights_loads_by_name():
    named, default = load_pretrained("sharedris_tiny"), load_pretrained("default")
    assert named.config == default.config
    assert all(torch.equal(a, b) for a, b in zip(named.state_dict().values(), default.state_dict().values()))


def test_load_pretrained_of_an_architecture_name_says_how_to_get_weights():
    with pytest.raises(PretrainedError) as info:
        load_pretrained("sharedris_base")
    message = str(info.value)
    assert "does not exist" not in message
    for needle in ("sharedris_base", "no weights ship", "sharedris train", "sharedris fetch weights beit3_base",
                   "docs/real-photos.md"):
        assert needle in message


# ------------------------------------------------------------------------------------- help
def test_every_option_has_help_and_every_parser_shows_defaults():
    from sharedris.cli import build_parser, iter_parsers

    parsers = list(iter_parsers(build_parser()))
    assert len(parsers) > 10
    for name, parser in parsers:
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), name
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.dest} has no help"
        parser.format_help()  # every help string formats (no stray % signs)


def test_help_shows_defaults_and_choices():
    from sharedris.cli import build_parser, iter_parsers

    parsers = dict(iter_parsers(build_parser()))
    predict_help = " ".join(parsers["sharedris predict"].format_help().split())
    assert "cpu, cuda or cuda:N" in predict_help and "(default: predictions)" in predict_help
    eval_help = " ".join(parsers["sharedris eval"].format_help().split())
    assert "synthetic" in eval_help and "refcoco" in eval_help


def test_loading_initialises_no_random_weights_and_gives_a_trainable_fp32_model(monkeypatch):
    reference = load_pretrained("default")
    draws = []
    real = torch.nn.init.trunc_normal_

    def counting(tensor, *args, **kwargs):
        draws.append(tensor.device.type)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", counting)
    model = load_pretrained("default")
    assert draws and set(draws) == {"meta"}  # the model is built without memory, then takes the file's tensors
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
