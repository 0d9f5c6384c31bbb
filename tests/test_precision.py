"""Precision policy: which precision runs where, and every precision staying close to fp32."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_model import TINY_MODEL

from sharedris import build_model
from sharedris import precision as P


@pytest.fixture
def machine(monkeypatch):
    """Simulate a machine: ``machine(cpu_bf16=..., cuda_bf16=...)`` sets what detection reports."""
    def simulate(cpu_bf16: bool, cuda_bf16: bool = False) -> None:
        monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: cpu_bf16)
        monkeypatch.setattr(P, "_cuda_has_bf16", lambda: cuda_bf16)
    return simulate


@pytest.mark.parametrize("cpu_bf16, cuda_bf16, device, expected", [
    (True, False, "cpu", "bf16"),
    (False, False, "cpu", "fp32"),       # emulated bf16 would be slower than fp32
    (False, True, "cuda", "bf16"),
    (True, False, "cuda:1", "fp32"),     # a GPU without native bf16, whatever the CPU has
])
def test_auto_picks_bf16_only_where_it_is_fast(machine, cpu_bf16, cuda_bf16, device, expected) -> None:
    machine(cpu_bf16, cuda_bf16)
    assert P.resolve_precision("auto", device) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_explicit_precisions_are_kept_on_cpu(machine, precision) -> None:
    machine(cpu_bf16=False)
    assert P.resolve_precision(precision, torch.device("cpu")) == precision


def test_int8_on_cuda_is_refused_before_touching_cuda(monkeypatch) -> None:
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA was queried")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    for call in (lambda: P.resolve_precision("int8", "cuda"),
                 lambda: P.prepare_model(torch.nn.Linear(2, 2), "int8", "cuda")):
        with pytest.raises(P.PrecisionError) as err:
            call()
        assert str(err.value).count(".") <= 1 and "\n" not in str(err.value)
        assert "CPU only" in str(err.value)


def test_unknown_precision_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="fp32, bf16, int8, auto"):
        P.resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("caps, expected", [
    ({"avx512_bf16": True, "amx_tile": False}, True),
    ({"amx_bf16": True, "amx_tile": True, "avx512_bf16": False}, True),
    ({"avx2": True, "avx512_f": True, "avx512_bf16": False}, False),
    ({"architecture": "arm64", "neon": True}, False),
])
def test_fast_bf16_is_read_from_torch_capabilities(monkeypatch, caps, expected) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert P.cpu_has_fast_bf16() is expected


def test_fast_bf16_falls_back_to_cpuinfo_flags(monkeypatch, tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert P._cpuinfo_flags(cpuinfo) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert P._cpuinfo_flags(tmp_path / "missing") == set()

    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"avx2", "amx_bf16"})
    assert P.cpu_has_fast_bf16() is True
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"avx2", "avx512f"})
    assert P.cpu_has_fast_bf16() is False


@pytest.mark.parametrize("cpu_bf16, cuda_bf16, amp, device, expected", [
    (True, False, "auto", "cpu", torch.bfloat16),
    (False, False, "auto", "cpu", None),
    (False, True, "auto", "cuda", torch.bfloat16),
    (False, False, "auto", "cuda", None),
    (True, False, "bf16", "cpu", torch.bfloat16),
    (False, True, "fp16", "cuda", torch.float16),
    (False, False, "none", "cpu", None),
])
def test_training_amp_dtype(machine, cpu_bf16, cuda_bf16, amp, device, expected) -> None:
    machine(cpu_bf16, cuda_bf16)
    assert P.training_amp_dtype(amp, device) == expected


@pytest.mark.parametrize("amp, cpu_bf16, message", [
    ("bf16", False, "slower than fp32"),
    ("fp16", True, "needs a GPU"),
    ("fp32", True, "auto, bf16, fp16, none"),
])
def test_training_amp_refusals(machine, amp, cpu_bf16, message) -> None:
    machine(cpu_bf16)
    with pytest.raises(P.PrecisionError, match=message):
        P.training_amp_dtype(amp, "cpu")


def test_autocast_context_on_cpu() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with P.autocast_context(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with P.autocast_context("cpu", None):
        assert (a @ b).dtype == torch.float32


@pytest.fixture(scope="module")
def tiny():
    """A random tiny model (eval mode), a batch of two pairs and its fp32 mask logits (2, 1, 64, 64)."""
    torch.manual_seed(0)
    model = build_model("sharedris_tiny", **TINY_MODEL).eval()
    image = torch.randn(2, 3, 64, 64)
    ids = torch.randint(0, 500, (2, 24))
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[1, 10:] = True
    with torch.no_grad():
        ref = model(image, ids, pad).mask_logits
    return model, (image, ids, pad), ref


# Tolerances relative to the largest fp32 logit. bf16 keeps 8 mantissa bits (0.4% per rounding) and
# int8 quantizes weights per channel and activations per token (about 1% per layer); through this model
# the measured worst cases were 2% (bf16) and 3% (int8). Pixels whose random-init logits sit near zero
# may flip sign, so masks are compared by agreement, not equality.
@pytest.mark.parametrize("precision, rel_tol", [("fp32", 0.0), ("bf16", 0.05), ("int8", 0.08)])
def test_each_precision_runs_close_to_fp32_and_leaves_the_model_alone(tiny, precision, rel_tol) -> None:
    model, inputs, ref = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run, dtype = P.prepare_model(model, precision, "cpu")
    assert dtype == (torch.bfloat16 if precision == "bf16" else None)
    with torch.no_grad(), P.autocast_context("cpu", dtype):
        logits = run(*inputs).mask_logits
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert (logits - ref).abs().max() <= rel_tol * ref.abs().max()
    assert ((logits > 0) == (ref > 0)).float().mean() >= 0.98
    assert (run is model) == (precision == "fp32")
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_int8_quantizes_the_linear_layers(tiny) -> None:
    import torchao.quantization as quantization  # the dev extra installs it
    run, _ = P.prepare_model(tiny[0], "int8", "cpu")
    weights = [m.weight for m in run.modules() if isinstance(m, torch.nn.Linear)]
    assert weights and all(isinstance(w, quantization.Int8Tensor) for w in weights)
    original = [m.weight for m in tiny[0].modules() if isinstance(m, torch.nn.Linear)]
    assert not any(isinstance(w, quantization.Int8Tensor) for w in original)


def test_int8_without_torchao_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # makes the import fail
    with pytest.raises(P.PrecisionError, match=r"pip install 'sharedris\[int8\]'"):
        P.prepare_model(torch.nn.Linear(2, 2), "int8", "cpu")


def test_gpu_check_runs_on_cpu_with_tiny_settings() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout.split("gpu_check on CPU", 1)[1].splitlines()
    rows = [line.split() for line in table if line.startswith("sharedris_tiny")]
    assert [r[1:3] for r in rows] == [["train", "bf16"]] * 4 + [["infer", "bf16"]] * 2 + [["ddp", "smoke"]]
    assert all(float(r[5]) > 0 for r in rows[:4])  # samples/s of the training cells
    assert rows[-1][8] == "ok"  # after "ddp smoke (torchrun, 1 proc) <batch> -"


def test_precision_breakdown_finds_the_matrix_products_and_the_attention_in_the_profile() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_breakdown.py"
    done = subprocess.run([sys.executable, str(script), "sharedris_tiny", "--threads", "1"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {}
    for line in done.stdout.splitlines():
        numbers = line.split()[-3:]
        if line.startswith(("matrix products", "attention", "other", "total")):
            rows[line[:18].strip()] = [float(numbers[0]), float(numbers[1])]
    assert list(rows) == ["matrix products", "attention", "other", "total"]
    for column in (0, 1):  # fp32, bf16 milliseconds: the operator names the groups expect are torch's
        assert rows["matrix products"][column] > 0 and rows["attention"][column] > 0
