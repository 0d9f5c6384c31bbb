"""Behaviour of our BEiT-3 encoder and its official-checkpoint loader (tiny configs, fast)."""

import argparse
import math
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from sharedris.modeling.beit3 import (
    BEiT3,
    BEiT3Config,
    CheckpointError,
    resample_vision_positions,
    sincos_2d,
)


def _official_keys(cfg: BEiT3Config) -> dict[str, torch.Tensor]:
    """A random state dict with exactly the official key layout (docs/reference.md) for ``cfg``."""
    D, F, g = cfg.embed_dim, cfg.mlp_dim, torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).half()  # noqa: E731  (official files are 16-bit)
    sd = {
        "beit3.text_embed.weight": r(cfg.vocab_size, D),
        "beit3.vision_embed.mask_token": r(1, 1, D),
        "beit3.vision_embed.cls_token": r(1, 1, D),
        "beit3.vision_embed.proj.weight": r(D, 3, cfg.patch_size, cfg.patch_size),
        "beit3.vision_embed.proj.bias": r(D),
        "beit3.encoder.embed_positions.A.weight": r(cfg.num_vision_tokens + 2, D),
        "beit3.encoder.embed_positions.B.weight": r(cfg.max_text_positions, D),
    }
    for i in range(cfg.depth):
        p = f"beit3.encoder.layers.{i}."
        for e in "AB":
            for n in "qkv":
                sd[f"{p}self_attn.{n}_proj.{e}.weight"], sd[f"{p}self_attn.{n}_proj.{e}.bias"] = r(D, D), r(D)
            sd[f"{p}self_attn.out_proj.{e}.weight"], sd[f"{p}self_attn.out_proj.{e}.bias"] = r(D, D), r(D)
            for ln in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
                sd[f"{p}{ln}.{e}.weight"], sd[f"{p}{ln}.{e}.bias"] = r(D), r(D)
            sd[f"{p}ffn.{e}.fc1.weight"], sd[f"{p}ffn.{e}.fc1.bias"] = r(F, D), r(F)
            sd[f"{p}ffn.{e}.fc2.weight"], sd[f"{p}ffn.{e}.fc2.bias"] = r(D, F), r(D)
            sd[f"{p}ffn.{e}.ffn_layernorm.weight"], sd[f"{p}ffn.{e}.ffn_layernorm.bias"] = r(F), r(F)
    for e in "AB":
        sd[f"beit3.encoder.layer_norm.{e}.weight"], sd[f"beit3.encoder.layer_norm.{e}.bias"] = r(D), r(D)
    return sd


CFG = BEiT3Config.tiny(image_size=64, depth=2, embed_dim=64, num_heads=2, mlp_dim=128, vocab_size=100)


@pytest.fixture
def official(tmp_path):
    sd = _official_keys(CFG)
    sd["head.weight"] = torch.zeros(2, 2).half()
    path = tmp_path / "beit3_tiny.pth"
    torch.save({"model": sd, "args": argparse.Namespace(model="beit3")}, path)
    return path, sd


def _inputs(cfg=CFG, batch=2, length=8):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, cfg.vocab_size, (batch, length), generator=g)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, 5:] = True
    ids[pad] = 1
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g), ids, pad


def test_loads_every_parameter_in_fp32(official):
    path, sd = official
    enc = BEiT3(CFG)
    report = enc.load_official_checkpoint(path)
    assert sorted(report.loaded) == sorted(enc.state_dict())
    assert sorted(report.ignored) == ["beit3.vision_embed.mask_token", "head.weight"]
    assert all(p.dtype == torch.float32 for p in enc.parameters())
    # q, k, v land in the right rows of the fused projection of the right expert
    qkv_b = enc.blocks[1].qkv.B.weight
    D = CFG.embed_dim
    assert torch.equal(qkv_b[D:2 * D], sd["beit3.encoder.layers.1.self_attn.k_proj.B.weight"].float())
    assert torch.equal(enc.blocks[0].mlp.A.norm.bias, sd["beit3.encoder.layers.0.ffn.A.ffn_layernorm.bias"].float())
    assert torch.equal(enc.pos_embed_text, sd["beit3.encoder.embed_positions.B.weight"].float())


def test_safetensors_file_loads_the_same(official, tmp_path):
    path, sd = official
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    a, b = BEiT3(CFG), BEiT3(CFG)
    a.load_official_checkpoint(path)
    b.load_official_checkpoint(st)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_missing_parameter_is_named(official, tmp_path):
    _, sd = official
    del sd["beit3.encoder.layers.1.ffn.B.fc2.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.B\.fc2\.weight"):
        BEiT3(CFG).load_official_checkpoint(path)


def test_wrong_model_size_is_a_clear_error(official):
    path, _ = official
    with pytest.raises(CheckpointError, match="expects"):
        BEiT3(BEiT3Config.tiny(image_size=64, depth=2, embed_dim=32, num_heads=2, mlp_dim=128,
                               vocab_size=100)).load_official_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sharedris_pwned_by_test",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = "/tmp/sharedris_pwned_by_test"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        BEiT3(CFG).load_official_checkpoint(path)
    assert not os.path.exists(marker)


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        BEiT3(CFG).load_official_checkpoint(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        BEiT3(CFG).load_official_checkpoint(junk)


def test_position_resampling_keeps_leading_rows_and_interpolates_grid():
    table = torch.randn(3 + 4 * 4, 8)
    same = resample_vision_positions(table, 4)
    assert torch.allclose(same, table, atol=1e-6)  # same grid: nothing changes
    big = resample_vision_positions(table, 7)
    assert big.shape == (3 + 49, 8)
    assert torch.equal(big[:3], table[:3])
    const = torch.ones(3 + 16, 8)  # a constant grid stays constant under bicubic resampling
    assert torch.allclose(resample_vision_positions(const, 6)[3:], torch.ones(36, 8), atol=1e-5)


def test_larger_image_loads_from_smaller_checkpoint(official):
    path, _ = official
    enc = BEiT3(BEiT3Config.tiny(image_size=96, depth=2, embed_dim=64, num_heads=2, mlp_dim=128, vocab_size=100))
    report = enc.load_official_checkpoint(path)
    assert report.resized["pos_embed_vision"] == ((3 + 16, 64), (3 + 36, 64))


def test_output_and_intermediates():
    enc = BEiT3(CFG).eval()
    image, ids, pad = _inputs()
    with torch.no_grad():
        out = enc(image, ids, pad)
        taps = enc.forward_intermediates(image, ids, pad, [1, 2])
    N = CFG.num_vision_tokens
    assert out.shape == (2, N + 8, CFG.embed_dim)
    assert [tuple(v.shape) for v, _ in taps] == [(2, N, 64)] * 2
    assert [tuple(t.shape) for _, t in taps] == [(2, 8, 64)] * 2
    # the final output is the last tap through the per-modality final norm
    v, t = taps[-1]
    assert torch.allclose(out[:, :N], enc.norm.A(v), atol=1e-6)
    assert torch.allclose(out[:, N:], enc.norm.B(t), atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        enc.forward_intermediates(image, ids, pad, [0])


def test_padding_is_invisible_to_real_tokens():
    """Appending more padding must not change any real token's output."""
    enc = BEiT3(CFG).eval()
    image, ids, pad = _inputs(batch=1)
    longer_ids = torch.cat([ids, torch.ones(1, 5, dtype=torch.long)], dim=1)
    longer_pad = torch.cat([pad, torch.ones(1, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a = enc(image, ids, pad)
        b = enc(image, longer_ids, longer_pad)
        c = enc(image, ids, None)  # without the mask the padded tokens do leak into the others
    real = CFG.num_vision_tokens + 5
    assert torch.allclose(a[:, :real], b[:, :real], atol=1e-5)
    assert not torch.allclose(a[:, :real], c[:, :real], atol=1e-3)


def test_wrong_image_size_is_a_clear_error():
    enc = BEiT3(CFG)
    _, ids, pad = _inputs()
    with pytest.raises(ValueError, match="built for 64x64"):
        enc(torch.zeros(2, 3, 32, 32), ids, pad)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = BEiT3(CFG).train()
    b = BEiT3(CFG).train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    image, ids, pad = _inputs()
    for m in (a, b):
        m(image, ids, pad).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_drop_path_only_in_training():
    enc = BEiT3(BEiT3Config.tiny(image_size=64, depth=2, embed_dim=64, num_heads=2, mlp_dim=128,
                                  vocab_size=100), drop_path_rate=0.5)
    image, ids, pad = _inputs()
    enc.eval()
    with torch.no_grad():
        assert torch.equal(enc(image, ids, pad), enc(image, ids, pad))
    enc.train()
    torch.manual_seed(0)
    outs = [enc(image, ids, pad) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_weight_decay_and_layer_ids():
    enc = BEiT3(CFG)
    names = dict(enc.named_parameters())
    assert enc.no_weight_decay() <= set(names)
    assert enc.layer_id("patch_embed.weight") == 0
    assert enc.layer_id("blocks.1.qkv.A.weight") == 2
    assert enc.layer_id("norm.B.bias") == CFG.depth + 1


def test_conv_stem_keeps_the_token_grid():
    cfg = BEiT3Config.tiny(image_size=64, patch_size=8, depth=1, embed_dim=32, num_heads=2, mlp_dim=64,
                           vocab_size=50, stem="conv")
    enc = BEiT3(cfg)
    image, ids, pad = _inputs(cfg)
    assert enc(image, ids, pad).shape == (2, 8 * 8 + 1 + 8, 32)
    with pytest.raises(ValueError, match="power-of-two"):
        BEiT3(BEiT3Config.tiny(image_size=96, patch_size=12, stem="conv"))


def test_sincos_positions_encode_row_and_column():
    cfg = BEiT3Config.tiny(image_size=64, patch_size=8, depth=1, embed_dim=32, num_heads=2, mlp_dim=64,
                           vocab_size=50, pos_init="sincos")
    table = BEiT3(cfg).pos_embed_vision.detach()
    codes = table[3:]  # rows 0-1: unused offset, row 2: CLS, then the 8x8 patches row-major
    assert torch.equal(codes, sincos_2d(8, 32))
    grid = codes.reshape(8, 8, 32)
    assert torch.equal(grid[2, 0, :16], grid[2, 7, :16])  # the first half depends on the row only
    assert torch.equal(grid[0, 5, 16:], grid[7, 5, 16:])  # the second half on the column only
    # column 6, the sines of the first two of 8 frequencies: 1 and 10000^(-1/8)
    assert grid[4, 6, 16:18].tolist() == pytest.approx([math.sin(6.0), math.sin(6 * 10000 ** (-1 / 8))], abs=1e-6)
    near, far = (grid[3, 3] - grid[3, 4]).norm(), (grid[3, 3] - grid[3, 7]).norm()
    assert near < far  # nearby patches get similar codes
    assert not torch.equal(BEiT3(replace(cfg, pos_init="normal")).pos_embed_vision[3:], codes)
    with pytest.raises(ValueError, match="pos_init"):
        BEiT3(replace(cfg, pos_init="learned"))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 30)
