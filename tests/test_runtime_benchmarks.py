"""benchmarks/gemm_efficiency.py, door_defaults.py and openvino_shapes.py on the tiny model: what they print."""

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *patterns: str) -> list[re.Match]:
    """Run ``script`` on the tiny model (1 run, 1 thread); the match of each pattern in what it printed."""
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), "sharedris_tiny", "--runs", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    matches = [re.search(p, run.stdout) for p in patterns]
    assert all(matches), run.stdout
    return matches


def test_gemm_efficiency_prints_both_rates_and_their_ratio():
    whole, linear, ratio = _run("gemm_efficiency.py", r"whole forward pass: +([\d.]+) GFLOP in +([\d.]+) ms",
                                r"its (\d+) linear layers alone: +([\d.]+) GFLOP in",
                                r"ratio \(whole / linear layers\): ([\d.]+)")
    assert int(linear[1]) > 0 and 0 < float(linear[2]) < float(whole[1])  # the linear layers are part of the pass
    assert 0 < float(ratio[1]) < 2


def test_door_defaults_names_what_auto_picks_and_the_speed_up():
    defaults, fp32, speed_up = _run("door_defaults.py",
                                    r"defaults \(precision auto -> (\w+), runtime auto -> (\w+)\): +([\d.]+) ms",
                                    r"precision fp32, runtime torch: +([\d.]+) ms", r"speed-up of the defaults: x([\d.]+)")
    assert defaults[2] == "openvino"  # a CPU with the openvino package installed
    assert abs(float(speed_up[1]) - float(fp32[1]) / float(defaults[3])) < 0.02 * float(speed_up[1]) + 0.01


def test_openvino_shapes_prints_both_times_their_ratio_and_that_both_answer_alike():
    fixed, dynamic, speed_up = _run("openvino_shapes.py", r"fixed shapes: +([\d.]+) ms", r"dynamic shapes: +([\d.]+) ms",
                                    r"speed-up of fixed shapes: x([\d.]+) \(mask logits differ by at most ([\d.e+-]+)\)")
    assert abs(float(speed_up[1]) - float(dynamic[1]) / float(fixed[1])) < 0.02 * float(speed_up[1]) + 0.01
    assert float(speed_up[2]) < 0.05  # bf16: two compilations of one model, not two models
