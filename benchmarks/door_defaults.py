"""One expression through the Predictor with the library's defaults against PyTorch fp32, side by side.

    python benchmarks/door_defaults.py sharedris_base --threads 2

`sharedris serve`, `sharedris predict` (one picture or a manifest) and `predict_manifest` all
answer through a :class:`~sharedris.predictor.Predictor` built with the defaults of
:mod:`sharedris.runtime` (precision ``auto``, runtime ``auto``) unless told otherwise. This builds a
registered model with random weights (seed 0; the shipped default model's tokenizer, since only the
timing matters), then two predictors on it: one with those defaults and one with
``precision="fp32", runtime="torch"``. Each answers one expression on a 640x480 picture (decoding,
preprocessing, model, full-size mask), called in turn, median of ``--runs`` after a warm-up; it
prints both times and their ratio. The first Predictor's conversion (when ``auto`` picks OpenVINO)
is kept in the user's conversion cache, as at any start.
"""

from __future__ import annotations

import numpy as np

from sharedris.benchmark import cpu_description, median_seconds, registered_model_from_args
from sharedris.modeling.pretrained import load_pretrained
from sharedris.predictor import Predictor


def main() -> None:
    args, model = registered_model_from_args(__doc__.split("\n\n")[0])
    tokenizer = load_pretrained("default").tokenizer_file
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    text = "the man on the left in a blue shirt"
    defaults = Predictor(model, tokenizer)
    fp32 = Predictor(model, tokenizer, precision="fp32", runtime="torch")
    times = median_seconds({"defaults": lambda: defaults.predict(image, text),
                            "fp32": lambda: fp32.predict(image, text)}, runs=args.runs)
    print(cpu_description())
    print(f"{args.model} ({model.config.image_size} px, random weights), one expression on a 640x480 picture, "
          f"{args.threads} threads, median of {args.runs}")
    print(f"  defaults (precision auto -> {defaults.precision}, runtime auto -> {defaults.runtime}): "
          f"{times['defaults'] * 1000:8.1f} ms")
    print(f"  precision fp32, runtime torch: {times['fp32'] * 1000:8.1f} ms")
    print(f"  speed-up of the defaults: x{times['fp32'] / times['defaults']:.2f}")


if __name__ == "__main__":
    main()
