"""The stem pre-training stage: which cells it reads, what it changes, and that it teaches shape."""

import numpy as np
import pytest
import torch
from _tiny_model import TINY_MODEL
from PIL import Image

from sharedris.data.synthetic import SHAPES, SyntheticRefScenes
from sharedris.modeling.registry import build_model, model_config
from sharedris.train.config import StemPretrainConfig
from sharedris.train.stem import object_batch, pretrain_stem

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class _OneImage:
    """A 100 x 50 (w x h) image with objects at chosen centres."""

    object_classes = ("a", "b")

    def __init__(self, objects):
        self.objects = objects

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return {"image": Image.fromarray(np.zeros((50, 100, 3), dtype=np.uint8)), "objects": self.objects}


def test_object_batch_maps_centres_to_feature_cells_and_names_to_indices():
    source = _OneImage([{"centre": (99.5, 0.0), "category": "b"}, {"centre": (25.0, 25.0), "category": "a"},
                        {"centre": (100.0, 50.0), "category": "a"}])
    images, cells, labels = object_batch(source, [0, 0], image_size=32, mean=MEAN, std=STD, grid=4)
    assert images.shape == (2, 3, 32, 32)
    # x scales by 4/100 and y by 4/50; the far edge clamps into the last cell.
    assert cells.tolist() == [[0, 0, 3], [0, 2, 1], [0, 3, 3], [1, 0, 3], [1, 2, 1], [1, 3, 3]]
    assert labels.tolist() == [1, 0, 0, 1, 0, 0]


def _tiny_model():
    torch.manual_seed(0)
    return build_model("sharedris_tiny", **TINY_MODEL)


def test_stage_changes_only_the_stem_and_leaves_the_global_rng_alone():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    head, summary = pretrain_stem(model.encoder.patch_embed, SyntheticRefScenes("train", size=64, length=8),
                                  StemPretrainConfig(steps=2, scenes_per_step=2), image_size=64, mean=MEAN,
                                  std=STD, device=torch.device("cpu"), show_progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.startswith("encoder.patch_embed.")}
    assert head.out_features == len(SHAPES) and head.in_features == TINY_MODEL["encoder"]["embed_dim"]
    assert [h["step"] for h in summary["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) and 0 <= h["accuracy"] <= 1 for h in summary["history"])


def test_stage_refuses_data_without_object_labels():
    class NoLabels(_OneImage):
        object_classes = ()

    with pytest.raises(ValueError, match="needs per-object category labels"):
        pretrain_stem(_tiny_model().encoder.patch_embed, NoLabels([]), StemPretrainConfig(steps=1), image_size=64,
                      mean=MEAN, std=STD, device=torch.device("cpu"))


@pytest.mark.slow
def test_stage_teaches_the_stem_to_tell_shapes_apart():
    """300 steps of 8 scenes (~10 s) take a small stem's held-out shape accuracy far above chance (1/6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = model_config("sharedris_tiny", **{**TINY_MODEL, "image_size": 128,
                                                "encoder": {**TINY_MODEL["encoder"], "embed_dim": 64}})
        torch.manual_seed(0)
        stem = build_model(cfg).encoder.patch_embed
        images, cells, labels = object_batch(SyntheticRefScenes("val", size=128, length=100), range(100), 128,
                                             cfg.mean, cfg.std, grid=8)
        head, _ = pretrain_stem(stem, SyntheticRefScenes("train", size=128, length=2400),
                                StemPretrainConfig(steps=300, scenes_per_step=8), image_size=128, mean=cfg.mean,
                                std=cfg.std, device=torch.device("cpu"), show_progress=False)
        with torch.no_grad():
            accuracy = (head(stem(images)[cells[:, 0], :, cells[:, 1], cells[:, 2]]).argmax(1) == labels).float().mean()
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.35, accuracy
