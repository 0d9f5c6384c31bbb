"""`sharedris bench model`: one row per model and precision, with ratios against fp32."""

import json

import pytest

from sharedris.cli import main


@pytest.mark.slow
def test_bench_model_reports_every_precision_with_ratios(capsys):
    pytest.importorskip("torchao")
    main(["bench", "model", "--models", "sharedris_tiny", "--precision", "fp32,bf16,int8,auto", "--runs", "1",
          "--batch", "2", "--threads", "1", "--train-steps", "0", "--json"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU ") and "AVX-512-BF16" in lines[0] and "AMX" in lines[0]
    assert "auto runs" in lines[1]
    rows = json.loads(lines[-1])["sharedris_tiny"]["precisions"]
    assert list(rows) == ["fp32", "bf16", "int8"]  # auto is fp32 or bf16: listed once
    fp32 = rows["fp32"]
    for row in rows.values():  # each ratio is fp32's time over this precision's, from the times reported
        assert row["latency_speedup"] == pytest.approx(fp32["latency_s"] / row["latency_s"])
        assert row["throughput_speedup"] == pytest.approx(row["throughput"] / fp32["throughput"])
    assert fp32["latency_speedup"] == 1.0
    table = [line.split() for line in lines if line.startswith("sharedris_tiny")]
    assert [cells[4] for cells in table] == ["fp32", "bf16", "int8"]
    assert all(cells[6].startswith("x") and cells[9].startswith("x") for cells in table)


def test_bench_model_without_fp32_reports_no_ratios(capsys):
    main(["bench", "model", "--models", "sharedris_tiny", "--precision", "bf16", "--runs", "1", "--batch", "1",
          "--threads", "1", "--train-steps", "0", "--json"])
    row = json.loads(capsys.readouterr().out.splitlines()[-1])["sharedris_tiny"]["precisions"]["bf16"]
    assert "latency_speedup" not in row and "throughput_speedup" not in row


@pytest.mark.parametrize("precision", ["fp16", ","])
def test_bench_model_bad_precision_is_one_sentence(capsys, precision):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "model", "--models", "sharedris_tiny", "--precision", precision])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert captured.err.startswith("sharedris bench: error: ") and captured.err.count("\n") == 1


@pytest.mark.slow
def test_bench_model_times_openvino_beside_torch(capsys):
    main(["bench", "model", "--models", "sharedris_tiny", "--precision", "fp32,int8", "--runtime", "torch,openvino",
          "--runs", "1", "--batch", "1", "--threads", "1", "--train-steps", "0", "--json"])
    lines = capsys.readouterr().out.splitlines()
    rows = json.loads(lines[-1])["sharedris_tiny"]["precisions"]
    assert list(rows) == ["fp32", "int8", "openvino fp32"]  # OpenVINO runs fp32 and bf16 only
    assert rows["openvino fp32"]["head_share"] is None
    assert rows["openvino fp32"]["latency_speedup"] == pytest.approx(rows["fp32"]["latency_s"]
                                                                      / rows["openvino fp32"]["latency_s"])
    table = [line for line in lines if line.startswith("sharedris_tiny")]
    assert "openvino fp32" in table[-1] and " - " in table[-1]


def test_bench_model_bad_runtime_is_one_sentence(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "model", "--models", "sharedris_tiny", "--runtime", "onnx"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "unknown runtime 'onnx'; choose one of torch, openvino" in err
    with pytest.raises(SystemExit) as exit_:  # auto picks one runtime; bench compares the ones it is given
        main(["bench", "model", "--models", "sharedris_tiny", "--runtime", "torch,auto"])
    assert exit_.value.code == 2 and "bench times the runtimes it is given by name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "model", "--models", "sharedris_tiny", "--runtime", ","])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "no runtime given" in err
