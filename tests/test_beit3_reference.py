"""Numerical parity of our BEiT-3 encoder with Microsoft's torchscale reference implementation.

torchscale is a test-only dependency (installed with --no-deps, see README); a missing install is a
failure, not a skip, because this is the check that our encoder is BEiT-3.
"""

import pytest
import torch

from sharedris.modeling.beit3 import BEiT3, BEiT3Config, resample_vision_positions
from sharedris.reference import torchscale_beit3


def _reference(image_size: int):
    try:
        return torchscale_beit3(BEiT3Config.base(image_size=image_size)).eval()
    except ImportError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def official_224(tmp_path_factory):
    """A random base model saved exactly like an official file: fp16, `beit3.` prefix, `args`."""
    import argparse

    torch.manual_seed(0)
    ref = _reference(224)
    state = ref.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            # perturb LayerNorms (identity at init) and positions so that every path matters
            if "norm" in name or "inner_attn_ln" in name or "embed_positions" in name:
                value.add_(torch.randn_like(value) * 0.3)
    path = tmp_path_factory.mktemp("ckpt") / "beit3_base_patch16_224.pth"
    model = {f"beit3.{k}": v.half() for k, v in state.items()}
    model["head.weight"] = torch.zeros(3, 768, dtype=torch.half)  # a pretraining/fine-tuning head
    torch.save({"model": model, "args": argparse.Namespace(lr=1e-4)}, path)
    return path, {k: v.half().float() for k, v in state.items()}


def _inputs(image_size: int, batch: int = 3, length: int = 20):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 3, image_size, image_size, generator=g)
    ids = torch.randint(4, 64010, (batch, length), generator=g)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[1, 7:] = True  # one short and one medium expression beside a full-length one
    pad[2, 15:] = True
    ids[pad] = 1
    return image, ids, pad


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [224, 320])
def test_matches_torchscale(official_224, image_size):
    path, fp32_state = official_224
    ours = BEiT3(BEiT3Config.base(image_size=image_size)).eval()
    report = ours.load_official_checkpoint(path)
    assert "head.weight" in report.ignored and "beit3.vision_embed.mask_token" in report.ignored
    assert ("pos_embed_vision" in report.resized) == (image_size != 224)

    ref = _reference(image_size)
    if image_size != 224:  # the reference has no resampling of its own: give it the resampled table
        key = "encoder.embed_positions.A.weight"
        fp32_state = dict(fp32_state, **{key: resample_vision_positions(fp32_state[key], image_size // 16)})
    ref.load_state_dict(fp32_state)

    image, ids, pad = _inputs(image_size)
    with torch.no_grad():
        expected = ref(textual_tokens=ids, visual_tokens=image, text_padding_position=pad)["encoder_out"]
        got = ours(image, ids, pad)
    assert got.shape == expected.shape == (3, (image_size // 16) ** 2 + 1 + 20, 768)
    assert expected.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    assert (got - expected).abs().max().item() < 1e-4
