"""Shared FPN, mask decoder, the full model and the config registry (tiny configs, CPU, seconds)."""

import json

import pytest
import torch

from sharedris.losses import RelationTargets, referring_loss, segmentation_loss
from sharedris.modeling import (
    FPNConfig,
    MaskDecoder,
    ModelConfig,
    SharedFPN,
    SegmenterOutput,
    SharedRIS,
    build_model,
    list_models,
    model_config,
)
from sharedris.modeling.decoder import (
    _within_mask,
    coordinate_channels,
    corrected_soft_iou,
    soft_iou,
    squared_distance_from_centre,
)
from sharedris.modeling.fpn import ConvLevel, SharedLevel


def _small(image_size: int = 64, patch_size: int = 8, **overrides) -> ModelConfig:
    """A few-thousand-parameter variant of the tiny model; overrides as for model_config."""
    kw = dict(
        image_size=image_size, text_len=8, taps=(1, 2, 3, 4),
        encoder=dict(depth=4, embed_dim=32, num_heads=2, mlp_dim=64, vocab_size=50, patch_size=patch_size),
        fpn=dict(width=32, num_heads=2, fine_width=0), decoder=dict(num_heads=2),
    )
    return model_config("sharedris_tiny", **{**kw, **overrides})


def _inputs(cfg: ModelConfig, batch: int = 2, length: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.encoder.vocab_size, (batch, length), generator=g)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, 5:] = True
    ids[pad] = 1
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g), ids, pad


def _meta_model(name: str, **overrides) -> SharedRIS:
    """Build a full-size model without memory or init time: parameters on the meta device."""
    with torch.device("meta"):
        return build_model(name, **overrides)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("image_size, patch_size", [(64, 8), (80, 16)])  # g = 8, and odd g = 5 (P5 floors to 2)
def test_every_stage_has_the_documented_shapes(image_size, patch_size):
    cfg = _small(image_size, patch_size)
    model = build_model(cfg).eval()
    image, ids, pad = _inputs(cfg)
    g, C, D, B, L = cfg.encoder.grid_size, 32, 32, 2, 8
    with torch.no_grad():
        taps = model.encoder.forward_intermediates(image, ids, pad, cfg.taps)
        feats = model.fpn(taps, pad, g)
        logits, presence, iou, _ = model.decoder(feats.pixel, feats.mid, feats.text, pad)
        full = model(image, ids, pad).mask_logits
    assert [tuple(v.shape) for v, _ in taps] == [(B, 1 + g * g, D)] * 4
    assert feats.pixel.shape == (B, C, 4 * g, 4 * g)
    assert feats.mid.shape == (B, C, g, g)
    assert feats.text.shape == (B, L, C)
    assert logits.shape == (B, 1, 4 * g, 4 * g) and presence.shape == iou.shape == (B,)
    assert full.shape == (B, 1, image_size, image_size)
    assert torch.isfinite(full).all()


@pytest.mark.parametrize("image_size, patch_size", [(64, 8), (80, 16)])  # P1 at stride 1, and at stride 2
def test_a_fine_level_doubles_the_pixel_resolution_and_sees_the_image(image_size, patch_size):
    cfg = _small(image_size, patch_size, fpn=dict(width=32, num_heads=2, fine_width=8))
    model = build_model(cfg).eval()
    image, ids, pad = _inputs(cfg)
    g = cfg.encoder.grid_size
    with torch.no_grad():
        taps = model.encoder.forward_intermediates(image, ids, pad, cfg.taps)
        feats = model.fpn(taps, pad, g, image)
        logits, presence, iou, _ = model.decoder(feats.pixel, feats.mid, feats.text, pad)
        with pytest.raises(ValueError, match="pass the image"):
            model.fpn(taps, pad, g)
    assert feats.pixel.shape == (2, 8, 8 * g, 8 * g) and logits.shape == (2, 1, 8 * g, 8 * g)
    # The image reaches the mask by the fine level as well as through the encoder: with the encoder's
    # taps held fixed, changing one pixel still changes the logits next to it.
    probe = image.clone().requires_grad_(True)
    out = model.decoder(*model.fpn(taps, pad, g, probe)[:3], pad)[0]
    out[0, 0, 5, 5].backward()
    assert probe.grad[0, :, 5, 5].abs().sum() > 0 and probe.grad[1].abs().sum() == 0
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model(_small(60, 4, encoder=dict(depth=4, embed_dim=32, num_heads=2, mlp_dim=64, vocab_size=50,
                                               patch_size=4, stem="conv"), fpn=dict(width=32, fine_width=8)))
    with pytest.raises(ValueError, match="fine_width"):
        FPNConfig(fine_width=-1)


def test_levels_without_a_shared_block_are_conv_only():
    fpn = SharedFPN(32, FPNConfig(width=32, num_heads=2, shared_levels=(5, 3)))
    assert isinstance(fpn.levels["p4"], ConvLevel)
    assert isinstance(fpn.levels["p5"], SharedLevel) and isinstance(fpn.levels["p3"], SharedLevel)
    taps = [(torch.randn(1, 1 + 36, 32), torch.randn(1, 4, 32)) for _ in range(4)]
    out = fpn(taps, None, 6)
    assert out.mid.shape == (1, 32, 6, 6) and out.pixel.shape == (1, 32, 24, 24)
    with pytest.raises(ValueError, match="shared_levels"):
        FPNConfig(shared_levels=(2,))
    with pytest.raises(ValueError, match="1 \\+ 5x5"):
        fpn(taps, None, 5)


def test_soft_iou_by_hand():
    # probabilities 0.8 and 0.6 inside the mask (logit > 0), 0.2 and 0.5 outside (0.5 is logit 0: outside)
    p = torch.tensor([[0.8, 0.6, 0.2, 0.5]])
    value = soft_iou(torch.logit(p))
    assert value.item() == pytest.approx((0.8 + 0.6) / (2 + 0.2 + 0.5), rel=1e-5)
    certain = torch.tensor([[20.0, 20.0, -20.0, -20.0]])  # a mask the model is sure of: expected IoU ~1
    assert soft_iou(certain).item() == pytest.approx(1.0, abs=1e-6)
    assert soft_iou(torch.full((1, 4), -1e4)).item() == 1.0  # nothing anywhere: the empty mask is right
    # the correction scales the expected error: log 2 doubles it, 0 keeps the soft IoU
    logits = torch.logit(p)
    assert corrected_soft_iou(torch.zeros(1), logits).item() == pytest.approx(value.item())
    assert 1 - corrected_soft_iou(torch.tensor([0.6931472]), logits).item() == pytest.approx(2 * (1 - value.item()), rel=1e-5)


def test_iou_from_mask_starts_at_the_soft_iou_of_the_full_size_mask_and_does_not_train_the_mask():
    cfg = _small()
    assert cfg.decoder.iou_from_mask
    model = build_model(cfg)
    image, ids, pad = _inputs(cfg)
    out = model(image, ids, pad)
    # a new head's correction is zero: the prediction is the soft IoU of the logits as returned
    assert torch.allclose(out.iou_pred, soft_iou(out.mask_logits[:, 0]), atol=1e-6)
    out.iou_pred.sum().backward()
    assert model.decoder.iou_mlp[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.decoder.mask_mlp.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.encoder.parameters())
    # with the setting off (checkpoints saved before it) the head's output is the prediction itself
    plain = build_model(_small(decoder=dict(num_heads=2, iou_from_mask=False)))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        q_out = plain(image, ids, pad).iou_pred
    assert torch.allclose(q_out, torch.zeros(2), atol=1e-6)


def test_coordinate_channels_by_hand():
    c = coordinate_channels(2, 4, torch.device("cpu"), torch.float32)  # pixel centres, -1..1 across the map
    assert c.shape == (2, 4, 5)
    assert torch.equal(c[0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # x
    assert torch.equal(c[:, 0, 1], torch.tensor([-0.5, 0.5]))  # y
    assert torch.equal(c[1, 3], torch.tensor([0.75, 0.5, 0.5625, 0.25, 0.375]))  # x, y, x^2, y^2, xy


def test_coordinate_features_start_as_no_change_and_let_the_query_add_a_function_of_position():
    cfg = _small(decoder=dict(num_heads=2, coord_features=True))
    model, plain = build_model(cfg).eval(), build_model(_small()).eval()
    loaded = plain.load_state_dict(model.state_dict(), strict=False)  # every weight but the map fits
    assert loaded.unexpected_keys == ["decoder.coord_proj.weight"] and not loaded.missing_keys
    image, ids, pad = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(image, ids, pad).mask_logits, plain(image, ids, pad).mask_logits)
    # the map from coordinates to pixel features is trained from the start
    target = torch.zeros(2, 1, cfg.image_size, cfg.image_size)
    target[:, :, 8:40, 16:48] = 1
    referring_loss(model.train()(image, ids, pad), target)["loss"].backward()
    assert model.decoder.coord_proj.weight.grad.abs().sum() > 0
    # with the x column set to the mask embedding m, each logit gains scale * |m|^2 * x: a ramp across the map
    seen = {}
    model.decoder.mask_mlp.register_forward_hook(lambda mod, args, out: seen.update(m=out.detach()))
    pixel = torch.randn(2, 32, 16, 16)
    mid, text = torch.randn(2, 32, 4, 4), torch.randn(2, 8, 32)
    model.eval()
    with torch.no_grad():
        before = model.decoder(pixel, mid, text, pad)[0]
        model.decoder.coord_proj.weight[:, 0] = seen["m"][0]
        after = model.decoder(pixel, mid, text, pad)[0]
    x = torch.linspace(-1 + 1 / 16, 1 - 1 / 16, 16)
    gain = model.decoder.logit_scale * (seen["m"][0] @ seen["m"][0]) * x
    assert torch.allclose(after[0, 0] - before[0, 0], gain.expand(16, 16), atol=1e-4)


def test_squared_distance_from_the_centre_of_a_mask_by_hand():
    logits = torch.full((1, 2, 4), -30.0)
    logits[0, 1, 3] = logits[0, 0, 3] = 30.0  # the right column: x 0.75, y -0.5 and 0.5
    d2 = squared_distance_from_centre(logits)[0]  # centre (0.75, 0)
    assert torch.allclose(d2[0], torch.tensor([2.25, 1.0, 0.25, 0.0]) + 0.25, atol=1e-5)
    assert torch.allclose(d2, d2.flip(0))  # the centre sits between the two rows


def test_anchor_point_starts_as_no_change_and_moves_logits_with_the_distance_from_the_anchor():
    cfg = _small(decoder=dict(num_heads=2, anchor_point=True))
    model, plain = build_model(cfg).eval(), build_model(_small()).eval()
    loaded = plain.load_state_dict(model.state_dict(), strict=False)
    assert {k.split(".")[1] for k in loaded.unexpected_keys} == {"anchor_mlp", "bowl_mlp"} and not loaded.missing_keys
    image, ids, pad = _inputs(cfg)
    with torch.no_grad():
        out = model(image, ids, pad)
        assert torch.equal(out.mask_logits, plain(image, ids, pad).mask_logits)
    assert out.anchor_logits is None  # evaluation: only what answers need
    # training: the anchor's logits at the input size, trained by the anchor's mask
    out = model.train()(image, ids, pad)
    assert out.anchor_logits.shape == (2, 1, cfg.image_size, cfg.image_size)
    anchors = torch.zeros(2, 1, cfg.image_size, cfg.image_size)
    anchors[:, :, 4:12, 40:56] = 1
    relations = RelationTargets(anchors, torch.tensor([True, True]), torch.zeros(2, 2, *anchors.shape[-2:], dtype=torch.bool))
    referring_loss(out, anchors.flip(-1), relations)["anchor"].backward()
    assert model.decoder.anchor_mlp[0].weight.grad.abs().sum() > 0
    # a weight a from the query adds 16 * a * (squared distance from the anchor mask's centre)
    pixel, mid, text = torch.randn(2, 32, 16, 16), torch.randn(2, 32, 4, 4), torch.randn(2, 8, 32)
    model.eval()
    with torch.no_grad():
        before, _, _, anchor = model.decoder(pixel, mid, text, pad)
        model.decoder.bowl_mlp[-1].bias.fill_(0.25)
        after = model.decoder(pixel, mid, text, pad)[0]
    assert torch.allclose(after - before, 4 * squared_distance_from_centre(anchor[:, 0]).unsqueeze(1), atol=1e-4)


def test_a_gated_anchor_term_moves_only_what_the_mask_holds_about_its_mean():
    logits = torch.full((1, 4, 4), -40.0)
    logits[0, 0, :2] = logits[0, 3, 3] = 40.0  # the mask: three pixels
    values = torch.arange(16.0).reshape(1, 4, 4)
    got = _within_mask(values, logits)
    held = torch.tensor([0.0, 1.0, 15.0])
    assert torch.allclose(got[0, 0, :2], held[:2] - held.mean()) and torch.allclose(got[0, 3, 3], held[2] - held.mean())
    assert got.abs().sum() - got[0, 0, :2].abs().sum() - got[0, 3, 3].abs() < 1e-6  # the rest: nothing
    with pytest.raises(ValueError, match="anchor_point too"):
        _small(decoder=dict(num_heads=2, anchor_gated=True))
    cfg = _small(decoder=dict(num_heads=2, anchor_point=True, anchor_gated=True))
    model, plain = build_model(cfg).eval(), build_model(_small()).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    image, ids, pad = _inputs(cfg)
    with torch.no_grad():  # a weight a of zero: no change
        assert torch.equal(model(image, ids, pad).mask_logits, plain(image, ids, pad).mask_logits)


def test_train_and_eval_return_the_same_type():
    cfg = _small()
    model = build_model(cfg)
    image, ids, pad = _inputs(cfg)
    out_train = model.train()(image, ids, pad)
    with torch.no_grad():
        out_eval = model.eval()(image, ids, pad)
    assert type(out_train) is type(out_eval) is SegmenterOutput
    assert out_train._fields == ("mask_logits", "presence_logits", "iou_pred", "anchor_logits")
    assert out_train.anchor_logits is out_eval.anchor_logits is None  # without decoder.anchor_point
    assert type(out_eval.mask_logits) is type(out_eval.presence_logits) is type(out_eval.iou_pred) is torch.Tensor
    assert out_eval.presence_logits.shape == out_eval.iou_pred.shape == (2,)
    assert out_train.mask_logits.shape == out_eval.mask_logits.shape
    with torch.no_grad():
        assert model(image, ids).mask_logits.shape == out_eval.mask_logits.shape  # no padding mask: every token is real


@pytest.mark.parametrize("fine_width", [0, 8])
def test_every_trainable_parameter_gets_a_gradient(fine_width):
    """DDP without find_unused_parameters requires it; the encoder's final norm is frozen (never run)."""
    cfg = _small(fpn=dict(width=32, num_heads=2, fine_width=fine_width))
    model = build_model(cfg)
    image, ids, pad = _inputs(cfg)
    target = torch.zeros(2, 1, cfg.image_size, cfg.image_size)
    target[:, :, 8:40, 16:48] = 1
    referring_loss(model(image, ids, pad), target)["loss"].backward()  # the training loss, every head
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["encoder.norm.A.bias", "encoder.norm.A.weight", "encoder.norm.B.bias", "encoder.norm.B.weight"]
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    zero = sorted(n for n, p in model.named_parameters() if p.requires_grad and not p.grad.any())
    assert zero == ["decoder.iou_mlp.0.bias", "decoder.iou_mlp.0.weight"]  # behind the IoU head's zero last layer
    assert all(p.grad.abs().sum() > 0 for p in model.encoder.patch_embed.parameters())


def test_blocks_after_the_deepest_tap_are_frozen():
    model = build_model(_small(taps=(1, 1, 2, 2)))
    assert all(not p.requires_grad for p in model.encoder.blocks[2:].parameters())
    assert all(p.requires_grad for p in model.encoder.blocks[:2].parameters())


def test_extra_padding_does_not_change_the_logits():
    cfg = _small()
    model = build_model(cfg).eval()
    image, ids, pad = _inputs(cfg, batch=1)
    pad[0, 5:] = True
    longer_ids = torch.cat([ids, torch.ones(1, 6, dtype=torch.long)], dim=1)
    longer_pad = torch.cat([pad, torch.ones(1, 6, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a = model(image, ids, pad).mask_logits
        b = model(image, longer_ids, longer_pad).mask_logits
    assert torch.allclose(a, b, atol=1e-5)


def test_tiny_model_overfits_two_samples():
    torch.manual_seed(0)
    cfg = _small(image_size=32)
    model = build_model(cfg)
    image, ids, pad = _inputs(cfg, batch=2, seed=1)
    target = torch.zeros(2, 1, 32, 32)
    target[0, :, 4:16, 4:16] = 1
    target[1, :, 12:28, 16:30] = 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(60):
        loss = segmentation_loss(model(image, ids, pad).mask_logits, target)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_no_weight_decay_names_are_real_parameters():
    model = build_model(_small())
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert nwd <= set(names)
    assert {"encoder.pos_embed_vision", "decoder.query_embed", "decoder.logit_scale"} <= nwd


def test_decoder_logit_scale_starts_at_inverse_sqrt_width():
    dec = MaskDecoder(_small().decoder, width=32)
    assert dec.logit_scale.item() == pytest.approx(32**-0.5)
    assert dec.logit_bias.item() == 0.0


# ---------------------------------------------------------------------------------- registry
def test_registered_models():
    assert list_models() == ["sharedris_base", "sharedris_large", "sharedris_tiny"]
    base, large, tiny = (model_config(n) for n in list_models())
    assert (base.taps, base.image_size, base.text_len, base.tokenizer) == ((4, 6, 8, 12), 480, 40, "beit3.spm")
    assert (base.encoder.depth, base.encoder.embed_dim, base.encoder.grid_size) == (12, 768, 30)
    assert (large.taps, large.encoder.depth, large.encoder.embed_dim) == ((8, 12, 16, 24), 24, 1024)
    assert base.fpn.width == large.fpn.width == 256
    assert base.fpn.pixel_channels == large.fpn.pixel_channels == 64 and tiny.fpn.pixel_channels == tiny.fpn.width
    assert (tiny.encoder.grid_size, tiny.fpn.width, tiny.fpn.num_heads, tiny.text_len) == (8, 64, 2, 24)
    assert tiny.fpn.fine_width == tiny.fpn.output_channels == 32 and base.fpn.output_channels == 64
    assert tiny.encoder.pos_init == "sincos" and base.encoder.pos_init == "normal"
    assert base.mean == base.std == (0.5, 0.5, 0.5)


def test_base_parameter_counts_on_meta_device():
    # official beit3_base_patch16_224: 220,987,392 minus the 768-float mask token only pretraining uses
    assert _count(_meta_model("sharedris_base", image_size=224).encoder) == 220_986_624
    model = _meta_model("sharedris_base")
    assert _count(model.encoder) == 220_986_624 + (30**2 - 14**2) * 768  # 480 px: a 30x30 position grid
    assert _count(model.fpn) + _count(model.decoder) < 0.05 * _count(model.encoder)


def test_large_builds_on_meta_device():
    model = _meta_model("sharedris_large")
    assert len(model.encoder.blocks) == 24 and model.fpn.cfg.width == 256


def test_tiny_builds_and_runs():
    cfg = model_config("sharedris_tiny")
    model = build_model("sharedris_tiny").eval()
    image, ids, pad = _inputs(cfg, batch=1, length=cfg.text_len)
    with torch.no_grad():
        assert model(image, ids, pad).mask_logits.shape == (1, 1, 128, 128)


def test_overrides_nest_and_image_size_sets_the_encoder():
    cfg = model_config("sharedris_tiny", image_size=96, fpn={"width": 48, "shared_levels": [5, 4]})
    assert cfg.encoder.image_size == cfg.image_size == 96 and cfg.fpn.shared_levels == (5, 4) and cfg.fpn.width == 48
    assert model_config("sharedris_tiny").fpn.width == 64  # the registry hands out fresh configs
    # derived values are stored once: the decoder takes the FPN's width, the input size is the encoder's
    assert build_model(cfg).decoder.query_embed.shape[-1] == 48
    assert model_config("sharedris_tiny", encoder={"image_size": 96}).image_size == 96
    with pytest.raises(ValueError, match="width"):
        model_config("sharedris_tiny", decoder={"width": 32})


def test_unknown_names_and_keys_are_clear_errors():
    with pytest.raises(ValueError, match="sharedris_base"):
        model_config("sharedris_huge")
    with pytest.raises(ValueError, match="widht"):
        model_config("sharedris_tiny", widht=3)
    with pytest.raises(ValueError, match="widht"):
        model_config("sharedris_tiny", fpn={"widht": 3})
    with pytest.raises(ValueError, match="taps"):
        model_config("sharedris_tiny", taps=(2, 4, 9, 6))


@pytest.mark.parametrize("name", ["sharedris_tiny", "sharedris_base", "sharedris_large"])
def test_config_dict_round_trip_is_exact(name):
    cfg = model_config(name, fpn={"shared_levels": (5, 4)})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d == cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg


def test_from_dict_rejects_unknown_and_missing_keys():
    d = model_config("sharedris_tiny").to_dict()
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="depht"):
        ModelConfig.from_dict({**d, "encoder": {**d["encoder"], "depht": 2}})
    with pytest.raises(ValueError, match="taps"):
        ModelConfig.from_dict({k: v for k, v in d.items() if k != "taps"})


def test_encoder_weights_go_through_the_official_loader(monkeypatch):
    seen = []
    monkeypatch.setattr("sharedris.modeling.beit3.BEiT3.load_official_checkpoint",
                        lambda self, path: seen.append(path))
    build_model(_small(), encoder_weights="beit3_base_patch16_224.pth")
    assert seen == ["beit3_base_patch16_224.pth"]


def test_narrow_pixel_level_shapes():
    cfg = _small(fpn=dict(width=32, num_heads=2, pixel_width=8, fine_width=0))
    model = build_model(cfg).eval()
    image, ids, pad = _inputs(cfg)
    taps = model.encoder.forward_intermediates(image, ids, pad, cfg.taps)
    feats = model.fpn(taps, pad, cfg.encoder.grid_size)
    assert feats.pixel.shape == (2, 8, 4 * cfg.encoder.grid_size, 4 * cfg.encoder.grid_size)
    assert feats.mid.shape[1] == 32
    assert model(image, ids, pad).mask_logits.shape == (2, 1, cfg.image_size, cfg.image_size)
