"""Wall time of one `sharedris predict` per runtime, with the conversion cache cold and warm.

    python benchmarks/start_time.py --model default --runs 5

Each run is a fresh process (import, model loading, conversion or cache read, one image, one
expression), as a user who calls the command once would see it. The cache lives in a temporary
SHAREDRIS_HOME: the first OpenVINO start converts and fills it (cold), the later ones read it
(warm). Warm OpenVINO starts and PyTorch starts alternate; the medians and their difference are
printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sharedris.benchmark import cpu_description

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "scene.png"


def predict_seconds(model: str, runtime: str, home: str, out: str) -> float:
    """Wall time of one `sharedris predict` process with ``runtime``; raises if it fails."""
    cmd = [sys.executable, "-m", "sharedris", "predict", str(EXAMPLE), "-t", "the blue diamond", "--model", model,
           "--runtime", runtime, "-o", out]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SHAREDRIS_HOME": home})
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"sharedris predict --runtime {runtime} failed: {run.stderr.strip().splitlines()[-1]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    parser.add_argument("--runtime", default="openvino", help="the runtime whose starts are compared with torch")
    parser.add_argument("--runs", type=int, default=5, help="warm starts of each runtime")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        out = str(Path(home) / "out")
        cold = predict_seconds(args.model, args.runtime, home, out)
        times: dict[str, list[float]] = {"torch": [], args.runtime: []}
        for _ in range(args.runs):
            for runtime in times:
                times[runtime].append(predict_seconds(args.model, runtime, home, out))
    torch_s, other_s = statistics.median(times["torch"]), statistics.median(times[args.runtime])
    print(cpu_description())
    print(f"sharedris predict, model {args.model}, one image and one expression, median of {args.runs} starts")
    print(f"  {args.runtime}, first start (converts, fills the cache): {cold:6.2f} s")
    print(f"  {args.runtime}, later starts (cache warm):               {other_s:6.2f} s")
    print(f"  torch:                                                  {torch_s:6.2f} s")
    print(f"  warm {args.runtime} - torch: {other_s - torch_s:+.2f} s; first start - torch: {cold - torch_s:+.2f} s")


if __name__ == "__main__":
    main()
