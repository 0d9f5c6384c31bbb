"""N expressions of one image in one `Predictor.predict` call vs N separate calls, side by side.

    python benchmarks/predictor_batching.py default --n 8 --threads 2
    python benchmarks/predictor_batching.py runs/tiny/best --image-size 640x480

The single encoder reads image and text together, so nothing per image can be cached; batching
the expressions into one forward pass is the only sharing there is. This prints the time per
expression both ways (end to end: decoding, preprocessing, model, full-size masks) and the ratio.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sharedris.benchmark import median_seconds
from sharedris.modeling.pretrained import load_pretrained
from sharedris.precision import PRECISIONS
from sharedris.predictor import Predictor
from sharedris.runtime import DEFAULT_PRECISION, DEFAULT_RUNTIME, RUNTIMES

TEXTS = ["the man on the left in a blue shirt", "red car", "the second cup from the right on the table",
         "dog", "the person holding an umbrella", "small white boat behind the pier", "left", "top sign"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="'default' or a checkpoint folder")
    parser.add_argument("--n", type=int, default=8, help="expressions per image")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image-size", default="640x480", help="WxH of the test image")
    parser.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                        help="the Predictor's precision (default: the library's)")
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIMES,
                        help="the Predictor's runtime (default: the library's)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    texts = (TEXTS * (args.n // len(TEXTS) + 1))[: args.n]
    predictor = Predictor(load_pretrained(args.model), precision=args.precision, runtime=args.runtime)

    def separate() -> None:
        for t in texts:
            predictor.predict(image, t)

    times = median_seconds({"batched": lambda: predictor.predict(image, texts), "separate": separate},
                           runs=args.runs)
    batched, each = times["batched"] / args.n, times["separate"] / args.n
    print(f"model {args.model}, {width}x{height} image, {args.n} expressions, {args.threads} threads, "
          f"precision {predictor.precision}, runtime {predictor.runtime}, median of {args.runs} runs")
    print(f"  one call with {args.n} expressions: {batched * 1000:8.1f} ms per expression")
    print(f"  {args.n} calls of one expression:   {each * 1000:8.1f} ms per expression")
    print(f"  batching speedup: x{each / batched:.2f}")


if __name__ == "__main__":
    main()
