"""Training config: typed defaults, YAML delta, ``a.b=c`` overrides, and the errors a typo must raise."""

import pytest
import yaml

from sharedris.config import ConfigError, merge, parse_overrides, to_dict
from sharedris.data.config import DataConfig
from sharedris.train.config import OptimConfig, TrainConfig, load_train_config


def _yaml(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_overrides():
    assert load_train_config() == TrainConfig()


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = _yaml(tmp_path, "epochs: 5\nbatch_size: 4\ndata:\n  num_workers: 3\n  seed: 1\noptim:\n  lr: 1.0e-4\n")
    cfg = load_train_config(path, ["epochs=7", "data.seed=9", "optim.weight_decay=0.5"])
    assert cfg.epochs == 7  # override beats YAML
    assert cfg.batch_size == 4  # YAML beats default
    assert cfg.data.num_workers == 3  # a nested override keeps the YAML's siblings
    assert cfg.data.seed == 9
    assert cfg.optim.lr == 1e-4
    assert cfg.optim.weight_decay == 0.5
    # untouched fields keep their defaults
    assert cfg.data.dataset == DataConfig().dataset
    assert cfg.optim.betas == OptimConfig().betas
    assert cfg.grad_accum == TrainConfig().grad_accum


def test_overrides_are_read_as_yaml():
    cfg = load_train_config(None, ["data.root=null", "out_dir=/tmp/x", "grad_checkpointing=true",
                                   'model_overrides={"taps": [1, 1, 2, 2], "fpn": {"width": 16}}'])
    assert cfg.data.root is None
    assert cfg.out_dir == "/tmp/x"
    assert cfg.grad_checkpointing is True
    assert cfg.model_overrides == {"taps": [1, 1, 2, 2], "fpn": {"width": 16}}
    assert load_train_config(None, ["data.root=/data/refer"]).data.root == "/data/refer"


@pytest.mark.parametrize("override, key", [
    ("epoch=3", "'epoch'"),
    ("data.datset=refcoco", "'data.datset'"),
    ("optim.lr_mult=2", "'optim.lr_mult'"),
])
def test_unknown_keys_raise_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_train_config(None, [override])


def test_unknown_key_in_yaml_raises(tmp_path):
    with pytest.raises(ConfigError, match="'loss.focal_weight'"):
        load_train_config(_yaml(tmp_path, "loss:\n  focal_weight: 1.0\n"))


@pytest.mark.parametrize("override, key", [
    ("epochs=abc", "epochs"),
    ("epochs=1.5", "epochs"),
    ("epochs=true", "epochs"),  # bool is an int subclass; still a type error
    ("grad_checkpointing=1", "grad_checkpointing"),
    ("optim.lr=fast", "optim.lr"),
    ("data.root=3", "data.root"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=0.9", "optim.betas"),
    ("data=3", "data"),
    ("model_overrides=[1, 2]", "model_overrides"),
])
def test_type_errors_raise(override, key):
    with pytest.raises(ConfigError, match=key):
        load_train_config(None, [override])


def test_numbers_are_converted_where_safe(tmp_path):
    # YAML 1.1 reads "1e-3" (no dot) as a string; a float field must still take it.
    cfg = load_train_config(_yaml(tmp_path, "optim:\n  lr: 1e-3\n"), ["optim.weight_decay=2e-2", "optim.poly_power=1"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.02 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.poly_power == 1.0 and isinstance(cfg.optim.poly_power, float)


def test_tuple_fields_from_lists(tmp_path):
    cfg = load_train_config(_yaml(tmp_path, "optim:\n  betas: [0.8, 0.95]\n"))
    assert cfg.optim.betas == (0.8, 0.95) and isinstance(cfg.optim.betas, tuple)
    assert load_train_config(None, ["optim.betas=[0.5, 1]"]).optim.betas == (0.5, 1.0)


def test_missing_or_malformed_file_raises(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(_yaml(tmp_path, "- epochs\n- 3\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(_yaml(tmp_path, "epochs: [1,\n"))


def test_malformed_overrides_raise():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["data=3", "data.seed=1"])


def test_to_dict_round_trips_through_yaml():
    cfg = load_train_config(None, ["epochs=3", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "data.root=/r",
                                   'model_overrides={"taps": [1, 1, 2, 2]}', "amp=none"])
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    back = merge(TrainConfig(), yaml.safe_load(text))
    assert back == cfg
    assert back.optim.betas == (0.8, 0.9)
