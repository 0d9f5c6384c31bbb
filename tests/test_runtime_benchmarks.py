"""benchmarks/gemm_efficiency.py and benchmarks/door_defaults.py on the tiny model: what they print."""

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str) -> str:
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), "sharedris_tiny", "--runs", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_gemm_efficiency_prints_both_rates_and_their_ratio():
    out = _run("gemm_efficiency.py")
    whole = re.search(r"whole forward pass: +([\d.]+) GFLOP in +([\d.]+) ms = +([\d.]+) GFLOP/s", out)
    linear = re.search(r"its (\d+) linear layers alone: +([\d.]+) GFLOP in +([\d.]+) ms = +([\d.]+) GFLOP/s", out)
    ratio = re.search(r"ratio \(whole / linear layers\): ([\d.]+)", out)
    assert whole and linear and ratio, out
    assert int(linear[1]) > 0 and 0 < float(linear[2]) < float(whole[1])  # the linear layers are part of the pass
    assert 0 < float(ratio[1]) < 2


def test_door_defaults_names_what_auto_picks_and_the_speed_up():
    out = _run("door_defaults.py")
    defaults = re.search(r"defaults \(precision auto -> (\w+), runtime auto -> (\w+)\): +([\d.]+) ms", out)
    fp32 = re.search(r"precision fp32, runtime torch: +([\d.]+) ms", out)
    speed_up = re.search(r"speed-up of the defaults: x([\d.]+)", out)
    assert defaults and fp32 and speed_up, out
    assert defaults[2] == "openvino"  # a CPU with the openvino package installed
    assert abs(float(speed_up[1]) - float(fp32[1]) / float(defaults[3])) < 0.02 * float(speed_up[1]) + 0.01
