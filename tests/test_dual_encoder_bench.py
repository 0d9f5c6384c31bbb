"""benchmarks/dual_encoder.py at tiny sizes: the dual-encoder pipeline, its counts, and the printed ratios."""

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from sharedris.benchmark import count_flops


def _bench_module() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dual_encoder.py"
    spec = importlib.util.spec_from_file_location("dual_encoder_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


D = _bench_module()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return D.build_models(64, tiny=True)


def test_dual_pipeline_gives_a_full_size_mask_from_a_quarter_size_decoder_and_ignores_padded_words(models) -> None:
    dual = models["dual"]
    image, ids, pad = D.inputs(models, 64, 4)
    pad[0, 2:] = True
    with torch.inference_mode():
        words = dual.text(input_ids=ids, attention_mask=(~pad).long()).last_hidden_state
        quarter = dual.decoder(dual.image_features(image, words, pad))
        full = dual(image, ids, pad)
        other_padding = ids.clone()
        other_padding[0, 2:] = (ids[0, 2:] + 1) % dual.text.config.vocab_size
        unchanged = dual(image, other_padding, pad)
        other_words = ids.clone()
        other_words[0, 0] = (ids[0, 0] + 1) % dual.text.config.vocab_size
        changed = dual(image, other_words, pad)
    assert quarter.shape == (1, 1, 16, 16)
    assert full.shape == (1, 1, 64, 64) and torch.isfinite(full).all()
    torch.testing.assert_close(unchanged, full)  # padded words reach neither BERT's words nor the PWAM
    assert not torch.allclose(changed, full)  # the text does reach the mask


def test_the_stage_loop_without_fusion_computes_what_swinmodel_forward_does(models) -> None:
    dual = models["dual"]
    image = D.inputs(models, 64, 4)[0]
    with torch.inference_mode():
        ours = dual.image_features(image, None, None)
        library = dual.swin(image, output_hidden_states=True,
                            output_hidden_states_before_downsampling=True).reshaped_hidden_states[1:]
    assert len(ours) == len(library) == 4
    for mine, theirs in zip(ours, library):
        torch.testing.assert_close(mine, theirs)


def test_parameter_counts_are_those_of_the_built_modules(models) -> None:
    for model in models.values():
        counted = D.part_params(model)
        assert counted["total"] == sum(p.numel() for p in model.parameters())
        for name, child in model.named_children():
            assert counted.get(name, 0) == sum(p.numel() for p in child.parameters())
    dual = models["dual"]
    text_dim = dual.text.config.hidden_size
    for fusion in dual.fusion:  # LAVT's per-stage sizes: PWAM's six 1x1 projections with biases, the gate, a norm
        d = fusion.norm.normalized_shape[0]
        lavt = 4 * (d * d + d) + 2 * (text_dim * d + d) + 2 * d * d + 2 * d
        assert sum(p.numel() for p in fusion.parameters()) == lavt
    assert isinstance(dual.swin.layernorm, torch.nn.Identity)  # the fusion's norms replace Swin's last one


def test_flops_are_positive_split_by_part_and_grow_with_the_image() -> None:
    totals = {}
    for size in (64, 96):
        built = D.build_models(size, tiny=True)
        args = D.inputs(built, size, 3)
        for name, model in built.items():
            def forward(model=model, args=args):
                return model(*args)

            flops = D.part_flops(model, forward)
            parts = {k: v for k, v in flops.items() if k != "total"}
            assert flops["total"] > 0 and all(v > 0 for v in parts.values())
            assert sum(parts.values()) == flops["total"]
            assert flops["total"] == count_flops(forward)  # the project's own counter agrees
            totals[name, size] = flops["total"]
            if name == "dual":
                assert set(parts) == {"swin", "text", "fusion", "decoder"}
    for name in ("sharedris", "dual"):
        assert totals[name, 96] > totals[name, 64]


def test_the_printed_ratios_are_the_ratios_of_the_printed_numbers(capsys, models) -> None:
    threads = torch.get_num_threads()
    try:
        D.main(["--tiny", "--image-size", "64", "--text-len", "4", "--threads", "1", "--runs", "1"])
    finally:
        torch.set_num_threads(threads)  # main sets the process's thread count; later tests keep theirs
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU ")
    assert f"kernels {torch.backends.cpu.get_cpu_capability()}" in lines[0]  # the CPU line names torch's kernel level

    def columns(line: str, n: int) -> list[float]:
        return [float(line[D.LABEL + 11 * i:D.LABEL + 11 * (i + 1)]) for i in range(n)]

    rows = {name: columns(next(line for line in lines if line.startswith(prefix)), 4)
            for name, prefix in (("sharedris", "sharedris_tiny"), ("dual", "dual: tiny Swin"))}
    ratio = {name: columns(next(line for line in lines if line.startswith(prefix)), 1)[0]
             for name, prefix in (("time", "time dual / sharedris"), ("params", "params sharedris / dual"),
                                  ("flops", "GFLOPs dual / sharedris"))}

    def close(printed: float, a: float, b: float) -> bool:
        # a and b are printed to 4 significant figures (0.05% each), the ratio to 3 decimals
        return abs(printed - a / b) <= 5e-4 + 1.01e-3 * a / b

    params, gflops, ms, rate = 0, 1, 2, 3
    assert close(ratio["time"], rows["dual"][ms], rows["sharedris"][ms])
    assert close(ratio["params"], rows["sharedris"][params], rows["dual"][params])
    assert close(ratio["flops"], rows["dual"][gflops], rows["sharedris"][gflops])
    for row in rows.values():  # GFLOP/s is GFLOPs over the time printed beside it
        assert row[rate] == pytest.approx(row[gflops] / (row[ms] / 1e3), rel=1.1e-3)
    for name, model in models.items():  # the printed parameters are the built models' (same seed, same config)
        assert rows[name][params] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, rel=5e-4)


def test_an_image_too_small_for_swins_last_window_is_one_sentence(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        D.main(["--image-size", "320", "--runs", "1"])
    assert exit_.value.code == 2
    assert "384 px or more" in capsys.readouterr().err
